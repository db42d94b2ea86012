"""Set ``PAGED_DECODE_LAUNCH`` (thrift_vllm/ops/paged_attention.py) to the best launch of a
``bench_paged.py --sections probe`` JSON, in this checkout.

Used on the device machine between calls of one session, so that the engine runs after the
probe use what it found; the same edit is then committed here (BENCHMARKS.md names the commit).

    python3 scripts/apply_probe_launch.py /tmp/paged.json
"""

import json
import re
import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parents[1] / "thrift_vllm" / "ops" / "paged_attention.py"


def main(path: str) -> int:
    rows = json.loads(Path(path).read_text())["rows"]
    best = [r["best_launch"] for r in rows if r.get("section") == "probe_best"]
    if not best:
        print(f"{path}: no probe_best row; PAGED_DECODE_LAUNCH unchanged")
        return 1
    src = TARGET.read_text()
    new, n = re.subn(r"PAGED_DECODE_LAUNCH = \{[^}]*\}", f"PAGED_DECODE_LAUNCH = {best[-1]!r}",
                     src)
    if n != 1:
        print("PAGED_DECODE_LAUNCH not found once in", TARGET)
        return 1
    TARGET.write_text(new)
    print("PAGED_DECODE_LAUNCH =", best[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
