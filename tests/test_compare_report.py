"""Report renderings and the mixed-precision proposal, on hand-built results (no model)."""

import csv
import io
import json

import pytest

from lowbit.compare.evaluate import Generation, Speed
from lowbit.compare.metrics import Agreement
from lowbit.compare.mixed import _patterns, propose
from lowbit.compare.report import ConfigResult, LayerError, Report

LAYERS = [f"model.layers.{i}.mlp.{kind}" for i in range(3) for kind in ("up_proj", "down_proj")]


def result(name, ppl_change, scheme, errors, est, *, bytes_per_layer=100, overrides=None, first_token=7):
    """A measured config: `errors` / `est` give each of LAYERS its relative error / estimated Δppl."""
    layers = [LayerError(n, scheme, e, s, bytes_per_layer, 400) for n, e, s in zip(LAYERS, errors, est)]
    return ConfigResult(
        name=name,
        description=f"{name} test config",
        config={"load_in_4bit": not scheme.startswith("int8"), "load_in_8bit": scheme.startswith("int8"),
                "bnb_4bit_quant_type": scheme, "llm_int8_threshold": 6.0, "llm_int8_weight_only": scheme == "int8-wo",
                "module_overrides": overrides or {}},
        quantize_seconds=0.5,
        linear_bytes=bytes_per_layer * len(LAYERS),
        total_bytes=bytes_per_layer * len(LAYERS) + 1000,
        linear_ratio=bytes_per_layer / 400,
        total_ratio=(bytes_per_layer * len(LAYERS) + 1000) / 3400,
        perplexity=10 * (1 + ppl_change),
        ppl_change=ppl_change,
        agreement=Agreement(100, 0.01, 0.05, 0.97, 0.95, 0.02, 0.03),
        speed=Speed(128, 12.5, 3.25),
        generations=[Generation("Hi?", "Hello there | friend", [5, first_token, 9], 1 if first_token != 7 else None,
                                len("Hello") if first_token != 7 else None)],
        layers=layers,
    )  # fmt: skip


def full_result():
    return ConfigResult(
        name="full", description="float32, not quantized", config={}, quantize_seconds=2.0,
        linear_bytes=2400, total_bytes=3400, linear_ratio=1.0, total_ratio=1.0, perplexity=10.0, ppl_change=0.0,
        agreement=None, speed=Speed(128, 10.0, 2.5), generations=[Generation("Hi?", "Hello world", [5, 7, 9], None, None)],
    )  # fmt: skip


def make_report(*results, proposal=None):
    return Report(
        model="tiny", model_note="weights are random", device="CPU (2 threads)", date="2026-01-01",
        versions={"lowbit": "0"}, text_source="a test text", tokens=100, context=64, stride=32, windows=3,
        sensitivity_tokens=63, results=[full_result(), *results], proposal=proposal,
    )  # fmt: skip


@pytest.fixture
def report():
    nf4 = result("nf4", 0.05, "nf4", [0.1, 0.2, 0.1, 0.1, 0.1, 0.3], [0.001, 0.03, 0.001, 0.002, 0.001, 0.01],
                 bytes_per_layer=60, first_token=8)  # fmt: skip
    int8 = result("int8", 0.002, "int8", [0.01] * 6, [0.0003] * 6, bytes_per_layer=110)
    return make_report(int8, nf4)


def test_summary_rows_hold_raw_numbers(report):
    rows = report.summary_rows()
    assert [r["config"] for r in rows] == ["full", "int8", "nf4"]
    assert rows[0]["kl_mean"] is None and rows[0]["ppl_change"] == 0.0
    assert rows[2]["ppl_change"] == 0.05 and rows[2]["linear_ratio"] == 60 / 400
    assert report["nf4"].name == "nf4"
    with pytest.raises(KeyError, match="no config named"):
        report["nope"]


def test_json_round_trips(report):
    data = json.loads(report.to_json())
    assert data["model"] == "tiny" and data["summary"][1]["config"] == "int8"
    assert data["results"][2]["layers"][1]["name"] == "model.layers.0.mlp.down_proj"


def test_csv_has_one_row_per_config_and_per_layer(report, tmp_path):
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["config"] for r in rows] == ["full", "int8", "nf4"]
    layer_rows = list(csv.DictReader(io.StringIO(report.to_csv(tmp_path / "s.csv", sensitivity=True))))
    assert len(layer_rows) == 2 * len(LAYERS)
    assert (tmp_path / "s.csv").read_text() == report.to_csv(sensitivity=True)


def test_markdown_table_and_marked_divergence(report):
    md = report.to_markdown()
    assert "| nf4 | 0.0 (×0.15) |" in md  # 360 bytes, 60 of the full 400 per layer
    assert "10.500 (+5.00%)" in md
    assert "- *nf4*: Hello⟦ there | friend" in md
    assert "- *int8*: Hello there | friend" in md  # no divergence, no marker
    # The most costly layer (by estimated Δppl) leads the sensitivity table.
    sensitivity = md.split("## Most sensitive layers")[1]
    assert sensitivity.index("model.layers.0.mlp.down_proj") < sensitivity.index("model.layers.2.mlp.down_proj")


def test_html_escapes_and_marks(report):
    page = report._repr_html_()
    assert page.count("<table>") == 3  # summary, sensitivity, one prompt
    assert "Hello<mark> there | friend</mark>" in page


def test_terminal_rendering(report):
    pytest.importorskip("rich")
    out = io.StringIO()
    report.print(file=out)
    text = out.getvalue()
    assert "Memory and speed" in text and "Accuracy against full precision" in text
    assert "+5.00%" in text and "model.layers.0.mlp.down_proj" in text


def test_dataframe(report):
    pd = pytest.importorskip("pandas")
    frame = report.to_dataframe()
    assert isinstance(frame, pd.DataFrame) and list(frame.index) == ["full", "int8", "nf4"]
    assert frame.loc["nf4", "top1"] == 0.97
    assert len(report.to_dataframe(sensitivity=True)) == 12


def test_plots_are_written(report, tmp_path):
    pytest.importorskip("matplotlib")
    report.plot_tradeoff(tmp_path / "t.png")
    report.plot_sensitivity(tmp_path / "s.png")
    for name in ("t.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_writes_every_format(report, tmp_path):
    pytest.importorskip("matplotlib")
    paths = report.save(tmp_path / "out")
    assert sorted(p.rsplit("/", 1)[1] for p in paths.values()) == sorted(
        ["report.md", "report.json", "summary.csv", "sensitivity.csv", "tradeoff.png", "sensitivity.png"]
    )


def test_save_without_per_layer_errors_writes_what_was_computed(report, tmp_path):
    pytest.importorskip("matplotlib")
    for result in report.results:
        result.layers = []  # as a run with sensitivity=False leaves them
    paths = report.save(tmp_path / "out")
    assert sorted(paths) == ["report.json", "report.md", "summary.csv", "tradeoff.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(paths)


# ---- mixed precision ------------------------------------------------------------------


def test_proposal_promotes_the_costliest_layers_first(report):
    # nf4's 5% change is shared by estimated cost: down_proj 0 carries 0.03 / 0.045 of it.
    proposal = propose(report.results[1:], budget=0.03)
    assert proposal.base == "nf4" and proposal.promoted == 1
    assert proposal.overrides == {r"^model\.layers\.(0)\.mlp\.down_proj$": "int8"}
    assert proposal.config["load_in_4bit"] and proposal.config["llm_int8_threshold"] == 6.0
    assert 0 < proposal.predicted_change <= 0.03 * 0.75


def test_proposal_trusts_a_measured_cost_over_the_estimate(report):
    # The estimate calls down_proj 0 the costliest; measured alone, it is free and down_proj 2 is what costs.
    nf4 = report["nf4"]
    nf4.layers[1].measured_ppl_change = -0.004
    nf4.layers[5].measured_ppl_change = 0.04
    proposal = propose(report.results[1:], budget=0.03)
    assert proposal.overrides == {r"^model\.layers\.(2)\.mlp\.down_proj$": "int8"}


def test_the_sensitivity_table_shows_measurements_and_their_agreement(report):
    for layer, measured in zip(report["nf4"].layers, [0.002, 0.02, None, 0.013, None, 0.012]):
        layer.measured_ppl_change = measured
    header, cells = report.sensitivity_table(top=3)
    assert [row[0] for row in cells] == [LAYERS[1], LAYERS[3], LAYERS[5]]  # by measured cost where measured
    assert cells[0][header.index("nf4")] == "20.0% / +3.00% / +2.00%"
    assert cells[0][header.index("int8")] == "1.0% / +0.03%"  # nothing measured there
    rho, n = report.estimate_agreement()["nf4"]
    assert n == 4 and rho == pytest.approx(0.8)  # ranks (1, 4, 2, 3) by estimate against (1, 4, 3, 2) measured
    # Four layers are too few for a rank correlation to mean much: the note says so instead of printing it.
    assert "+0.80" not in report.to_markdown() and "too few for a rank correlation" in report.to_markdown()


def test_proposal_keeps_the_base_when_it_fits(report):
    proposal = propose(report.results[1:], budget=0.10)
    assert proposal.promoted == 0 and proposal.overrides == {}


def test_proposal_falls_back_to_full_precision_when_int8_misses_the_budget(report):
    proposal = propose(report.results[1:], budget=0.001)  # int8 alone costs 0.2%
    assert set(proposal.overrides.values()) == {"none"} and proposal.high == "full precision"
    # nf4 would need every layer in full precision (2400 bytes); int8 with 4 of its 6 layers full is 1820.
    assert proposal.base == "int8" and proposal.promoted == 4


def test_proposal_considers_every_measured_scheme(report):
    # int8-wo (as small as int8, more accurate) is measured too: promoting nf4's layers to it beats int8.
    int8_wo = result("int8-wo", 0.001, "int8-wo", [0.005] * 6, [0.00015] * 6, bytes_per_layer=110)
    proposal = propose([*report.results[1:], int8_wo], budget=0.03)
    assert proposal.base == "nf4" and proposal.high == "int8-wo"
    assert set(proposal.overrides.values()) == {"int8-wo"}
    from lowbit import LowbitConfig

    config = LowbitConfig(**proposal.config)
    assert config.scheme_for(LAYERS[1]) == "int8-wo" and config.scheme_for(LAYERS[0]) == "nf4"


def test_proposal_is_a_uniform_config_that_already_meets_the_budget():
    # Promoting nf4's costly layers to full precision would take more bytes than int8-wo as it is.
    nf4 = result("nf4", 0.30, "nf4", [0.1] * 6, [0.05] * 6, bytes_per_layer=60)
    int8_wo = result("int8-wo", 0.004, "int8-wo", [0.01] * 6, [0.0006] * 6, bytes_per_layer=110)
    proposal = propose([nf4, int8_wo], budget=0.005)
    assert proposal.base == "int8-wo" and proposal.promoted == 0 and proposal.overrides == {}
    proposal.result, proposal.measured_change = "int8-wo", 0.004
    report = make_report(nf4, int8_wo, proposal=proposal)
    assert "int8-wo meets it as it is (+0.40%)" in report.to_markdown()
    # The sensitivity table keeps every config's column when the proposal is one of them.
    header, _ = report.sensitivity_table()
    assert header == ["layer", "nf4", "int8-wo"]


def test_proposal_needs_measured_layers():
    with pytest.raises(ValueError, match="per-layer errors"):
        propose([full_result()], budget=0.01)
    with pytest.raises(ValueError, match="≥ 0"):
        propose([], budget=-0.1)


def test_patterns_group_layer_indices():
    everything = [f"model.layers.{i}.{k}" for i in range(12) for k in ("q", "v")] + ["lm_head"]
    chosen = [f"model.layers.{i}.v" for i in range(12)] + ["model.layers.3.q", "model.layers.11.q", "lm_head"]
    patterns = _patterns(chosen, everything)
    assert patterns == [r"^model\.layers\.\d+\.v$", r"^model\.layers\.(3|11)\.q$", r"^lm_head$"]
    import re

    matched = [n for n in everything if any(re.search(p, n) for p in patterns)]
    assert sorted(matched) == sorted(chosen)


def test_what_to_use_names_the_smallest_config_within_each_budget(report):
    int8_wo = result("int8-wo", 0.001, "int8-wo", [0.005] * 6, [0.00015] * 6, bytes_per_layer=110)
    report = make_report(report["int8"], int8_wo, report["nf4"])
    line = report.to_markdown().split("What to use: ")[1].split("\n")[0]
    # int8-wo ties int8 on bytes and wins on perplexity within +0.5% to +2%; nf4 (+5%) is the smallest within +5%.
    assert line.startswith("within +0.5%, +1%, +2%: int8-wo (0.0 MB linear, ×0.28; perplexity +0.10%)")
    assert "within +5%: nf4" in line and "smallest measured" not in line
    assert report.advice((0.001,))[-1][1].name == "nf4"  # smallest overall, named even outside every budget


def test_busy_machine_timings_are_flagged(report):
    assert "Warning" not in report.to_markdown()
    report["nf4"].speed = Speed(128, 12.5, 3.25, prefill_spread=0.6, decode_spread=0.1)
    md = report.to_markdown()
    assert "Warning: the timed runs of nf4 differed by more than 25%" in md
    assert "12.5 ±30%" in md  # the spread, as ± half of it


def test_html_keeps_the_newlines_of_generated_code(report):
    report["nf4"].generations[0].text = "def f():\n    return 1"
    page = report._repr_html_()
    assert "white-space: pre-wrap" in page and "():\n    return 1</mark>" in page


def test_repr_is_a_summary_not_a_field_dump(report):
    text = repr(report)
    assert text.startswith("lowbit compare: tiny on CPU") and "perplexity (Δ)" in text and "What to use" in text
    assert "LayerError(" not in text and len(text.splitlines()) < 15
