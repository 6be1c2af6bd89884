"""``reft_kernels.benchmark.mixed_generate`` runs on a tiny model and reports what it promises."""
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from reft_kernels.benchmark import mixed_generate  # noqa: E402


def test_mixed_generate_reports_every_provider_and_ratio():
    lines = []
    rows = mixed_generate.run(model="tiny", batch=4, adapters=(1, 2), prompt_len=6, new_tokens=2, rounds=1,
                              log=lines.append)
    assert [r["adapters"] for r in rows] == [1, 2] and len(lines) == 2
    for row in rows:
        assert all(row[f"{p}_tok_s"] > 0 for p in mixed_generate.PROVIDERS)
        single, mixed, switching = (row["batch"] * row["new_tokens"] / row[f"{p}_tok_s"]
                                    for p in ("single", "mixed", "switching"))
        assert row["mixed_vs_single"] == pytest.approx(mixed / single)
        assert row["mixed_speedup_vs_switching"] == pytest.approx(switching / mixed)


def test_adapter_counts_must_divide_the_batch():
    with pytest.raises(ValueError, match="each K must divide the batch of 4, got 3"):
        mixed_generate.run(model="tiny", batch=4, adapters=(3,), rounds=1)
