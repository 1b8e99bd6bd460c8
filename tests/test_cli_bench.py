"""`polar-jax bench decode` follows the CLI's rules (issue 11): one `error:` line and exit 2 for a mistake,
numeric flags typed by polar_jax.validate, defaults in the help, `--tiny` never overriding a flag the user
gave, 7B shapes refused on a host without a GPU, and the files it writes never replacing a user's file."""

from __future__ import annotations

import json

import pytest

from cli_helpers import assert_refused, run_cli, tree_digest
import polar_jax.policy
from polar_jax.bench import decode_bench
from polar_jax.bench.shapes import SHAPES
from polar_jax.policy import PATH as POLICY_PATH


@pytest.mark.parametrize("flags, words", [
    (["--shapes", "gpt-5"], "--shapes"),
    (["--batches", "0"], "--batches"),
    (["--batches", "8", "-1"], "--batches"),
    (["--contexts", "0"], "--contexts"),
    (["--steps", "x"], "--steps"),
    (["--repeats", "0"], "--repeats"),
    (["--processes", "0"], "--processes"),
    (["--rank", "0"], "--rank"),
    (["--bw-bytes", "0"], "--bw-bytes"),
    (["--attn-density", "1.5"], "--attn-density"),
    (["--mlp-density", "nan"], "--mlp-density"),
    (["--variants", "fast"], "--variants"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_flags_are_one_error_line(capsys, flags, words):
    """argparse used to print its usage and the error (several lines); `--tiny --rank 0` ran (rank replaced)."""
    assert_refused(capsys, ["bench", "decode", "--tiny", *flags], words)


def test_large_shapes_need_a_gpu(capsys):
    """Plain `polar-jax bench decode` on a CPU-only host used to build 7B models until the OOM killer came."""
    assert_refused(capsys, ["bench", "decode"], "need a GPU")
    assert_refused(capsys, ["bench", "decode", "--tiny", "--shapes", "llama2-7b"], "need a GPU")
    assert_refused(capsys, ["bench"], "required")


def test_tiny_fills_only_the_flags_not_given():
    args = decode_bench.parse_args(["--tiny", "--batches", "2", "3", "--rank", "8"])
    assert args.batches == [2, 3] and args.rank == 8  # given: kept
    assert args.shapes == ["tiny-opt", "tiny-llama"] and args.contexts == [32] and args.steps == 2  # not given
    args = decode_bench.parse_args(["--shapes", "tiny-opt"])
    assert args.batches == [1, 8, 32] and args.rank == 1024 and args.steps == 64  # without --tiny: the defaults


def test_help_shows_defaults(capsys):
    code, out, _ = run_cli(capsys, "bench", "decode", "--help")
    text = " ".join(out.split())
    assert code == 0
    for entry in ("(default: 1 8 32; with --tiny: 1 4)", "(default: 0.3)", "(default: 1024, the paper's; with --tiny: 16)",
                  "(default: 1)", "(default: 64; with --tiny: 2)"):
        assert entry in text, entry


def test_files_read_and_written_are_checked_before_measuring(tmp_path, capsys, monkeypatch):
    def no_measuring(args):
        raise AssertionError("measured before checking its files")

    monkeypatch.setattr(decode_bench, "worker", no_measuring)
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"mine": True}))
    text = tmp_path / "notes.txt"
    text.write_text("not JSON")
    before = tree_digest(tmp_path)
    assert_refused(capsys, ["bench", "decode", "--tiny", "--write-policy", notes], "not a decode policy table")
    assert_refused(capsys, ["bench", "decode", "--tiny", "--write-policy", tmp_path], "is a folder")
    assert_refused(capsys, ["bench", "decode", "--tiny", "--policy", text], "not valid JSON")
    assert_refused(capsys, ["bench", "decode", "--tiny", "--policy", notes], "not a decode policy table")
    assert_refused(capsys, ["bench", "decode", "--tiny", "--policy", tmp_path / "missing.json"], "missing")
    assert_refused(capsys, ["bench", "decode", "--tiny", "--out", text], "not a folder")
    assert_refused(capsys, ["bench", "decode", "--merge", notes], "not a report of `polar-jax bench decode`")
    assert_refused(capsys, ["bench", "decode", "--merge", text], "not valid JSON")
    assert tree_digest(tmp_path) == before


def test_write_policy_keeps_the_points_and_devices_it_did_not_measure(tmp_path):
    """A run on one GPU adds its points to the committed table: another device's entries and the points it
    did not measure stay (with their own run's provenance), a point measured again takes the new entry."""
    committed = json.loads(POLICY_PATH.read_text())
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(committed))
    h200 = committed["entries"][0]
    again = dict(h200, speedup={"dense": 1.0, "heads": 1.5}, source="a second run", date="2026-12-08")
    other = dict(h200, device="a GPU the table has not seen", speedup={"dense": 1.0, "mlp": 1.2}, source="its run",
                 date="2026-12-08")
    new = {"source": "the newest run", "date": "2026-12-08", "jax_version": "0.11.2", "entries": [again, other]}
    decode_bench.write_policy(path, new)
    written = json.loads(path.read_text())
    key = lambda e: (e["device"], e["shape"], e["batch"], e["context"])  # noqa: E731
    by = {key(e): e for e in written["entries"]}
    assert len(written["entries"]) == len(committed["entries"]) + 1  # one point replaced, one added
    assert by[key(h200)] == again and by[key(other)] == other
    for e in committed["entries"][1:]:  # kept, now naming the run that measured them
        assert by[key(e)] == {**{k: committed[k] for k in ("source", "date", "jax_version")}, **e}
    assert written["source"] == "the newest run"
    for e in written["entries"]:
        v = polar_jax.policy.choose_variant(SHAPES[e["shape"]], e["batch"], e["context"], True,
                                            table=written, device=e["device"])
        assert v == "dense" or e["speedup"][v] >= polar_jax.policy.MARGIN


def test_write_policy_replaces_only_a_policy_table(tmp_path):
    table = json.loads(POLICY_PATH.read_text())
    old = tmp_path / "policy.json"
    old.write_text(json.dumps({"entries": []}))
    decode_bench.write_policy(old, table)
    assert json.loads(old.read_text()) == table
    fresh = tmp_path / "sub" / "policy.json"
    decode_bench.write_policy(fresh, table)
    assert json.loads(fresh.read_text()) == table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.json", "sub"]  # no temporary left


def test_merging_a_multi_process_report_keeps_its_processes():
    """A report of 2 fresh processes merged (alone, or with another report) keeps both processes: the same
    medians and spreads, not one collapsed worker."""
    from pathlib import Path
    raw = Path(__file__).resolve().parents[1] / "benchmarks/results/raw_2026-11-29b_h200"
    opt, ll = raw / "call5_opt_b1_b8_b32.json", raw / "call4_ll_b1.json"
    merged = decode_bench.merge_reports([opt, ll], ["--merge", str(opt), str(ll)])
    src = {(r["shape"], r["batch"], r["variant"]): r for p in (opt, ll) for r in json.loads(p.read_text())["rows"]}
    assert len(merged["rows"]) == len(src) == 8
    for r in merged["rows"]:
        want = src[(r["shape"], r["batch"], r["variant"])]
        assert r["processes"] == 2 and r["step_s"] == want["step_s"]
        assert list(r["spread"]) == list(want["spread"]) and r["step_s_processes"] == want["step_s_processes"]
