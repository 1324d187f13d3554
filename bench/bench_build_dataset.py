"""build_dataset.py's peak memory against the number of rows: the synthetic stage outputs of
bench/bench_viewer.py (real train questions, persona rewrites and reflection rows, responses of about
--response_chars characters) at 1/16, 1/4 and the whole of --rows, each built by build_dataset.py in
its own process (the default decontamination against the test sets, the rule judge), its peak
resident memory read by /usr/bin/time. It prints each scale's rows, input size, peak and seconds, and
the peak's growth per 1,000 rows against the inputs' size per 1,000 rows (the baseline: a build that
held every row as read would grow at least that fast, and more in Python's objects).

    python bench/bench_build_dataset.py [--rows 128900]
"""
import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_viewer import synthesize  # noqa: E402


def build(inputs: list[Path], out: Path) -> tuple[float, float]:
    """(peak resident MiB, seconds) of build_dataset.py over the inputs."""
    started = time.monotonic()
    result = subprocess.run(["/usr/bin/time", "-f", "peak_kb=%M", sys.executable, str(ROOT / "build_dataset.py"),
                             "--inputs", *map(str, inputs), "--output_dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"build_dataset failed:\n{result.stderr[-3000:]}")
    peak_kb = int(re.search(r"peak_kb=(\d+)", result.stderr).group(1))
    return peak_kb / 1024, time.monotonic() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=128_900, help="kept rows at the whole scale (v2: 128.9K)")
    p.add_argument("--response_chars", type=int, default=1200, help="median response length, characters")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for share in (16, 4, 1):
            rows = args.rows // share
            folder = Path(tmp) / f"rows{rows}"
            inputs, _, _ = synthesize(folder, rows, 0, args.response_chars)
            size = sum(path.stat().st_size for path in inputs) / 2**20
            peak, seconds = build(inputs, folder / "dataset")
            results.append((rows, size, peak, seconds))
    cpu = sorted({flag for line in open("/proc/cpuinfo") if line.startswith("flags")
                  for flag in line.split() if flag in ("avx2", "avx512_bf16", "amx_bf16")})
    print(f"bench_build_dataset: build_dataset.py over synthetic stage outputs; CPU flags {' '.join(cpu)}")
    print("| rows | inputs (MiB) | peak (MiB) | seconds |\n|---:|---:|---:|---:|")
    for rows, size, peak, seconds in results:
        print(f"| {rows:,} | {size:.0f} | {peak:.0f} | {seconds:.0f} |")
    (small_rows, small_size, small_peak, _), (rows, size, peak, _) = results[0], results[-1]
    growth = (peak - small_peak) / (rows - small_rows) * 1000
    inputs_growth = (size - small_size) / (rows - small_rows) * 1000
    print(f"peak grows {growth:.2f} MiB per 1,000 rows, the inputs {inputs_growth:.2f} MiB per 1,000 rows: "
          f"ratio {growth / inputs_growth:.2f} (a build holding every row as read grows at least as fast as the "
          f"inputs, and several times that in Python's objects)")


if __name__ == "__main__":
    main()
