"""benchmarks/translation_quality.py runs end to end (smoke preset, synthetic Multi30k) and gives
the columns docs/BENCHMARKS.md reads, for the MoE model and its dense twin, with the scores of the
averaged last snapshots (``--average``) beside those of best.pt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "translation_quality.py"


def test_quality_benchmark_json_rows(multi30k_root: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--data-dir", str(multi30k_root),
                           "--beam", "2", "--average", "2", "--out", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["model"] for row in rows] == ["moe", "dense"]
    for row in rows:
        assert row["updates"] == 8 and row["split"] == "test_2016_flickr" and row["beam"] == 2
        for key in ("bleu", "chrf", "bleu_lowercase", "length_ratio"):
            assert row[key] >= 0
        assert row["train_target_tokens_per_s"] > 0 and row["sentences_per_s"] > 0
        assert (Path(row["run_dir"]) / "hypotheses" / "test_2016_flickr.beam2.txt").is_file()
        assert row["average"] == 2 and row["avg_checkpoints"] == ["epoch-0001.pt", "epoch-0002.pt"]
        for key in ("avg_bleu", "avg_chrf", "avg_bleu_lowercase", "avg_length_ratio"):
            assert row[key] >= 0
        scored = json.loads((Path(row["run_dir"]) / "eval" / "test_2016_flickr.beam2.avg2.json").read_text())
        assert scored["bleu"] == row["avg_bleu"] and scored["weights"] == "average"
    assert rows[0]["parameters"] > rows[1]["parameters"]  # 4 experts of 32 vs one FFN of 64
