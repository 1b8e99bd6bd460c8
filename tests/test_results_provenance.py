"""Every file in benchmarks/results states (itself, by its name's JSON, or through results/PROVENANCE.json)
the device, jax version, date and command; an unknown field is the explicit "not recorded" (or, for jax, "not
used") and nothing else."""

from __future__ import annotations

import re
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import provenance  # noqa: E402

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
JAX = re.compile(r"^\d+\.\d+\.\d+$")


def check_field(field: str, value: str) -> str | None:
    """None if the value is acceptable, else why not."""
    if value == provenance.NOT_RECORDED or (field == "jax" and value == provenance.NOT_USED):
        return None
    vague = ("not recorded", "not used", "unknown")
    if not value.strip() or any(v in value.lower() for v in vague) or value in ("?", "None"):
        return f"{field} {value!r}: say exactly {provenance.NOT_RECORDED!r} or give the value"
    parts = value.split("; ")
    if field == "date" and not all(DATE.match(p) for p in parts):
        return f"date {value!r} is not YYYY-MM-DD"
    if field == "jax" and not all(JAX.match(p) for p in parts):
        return f"jax {value!r} is not a version"
    return None


def test_every_result_file_states_device_jax_date_and_command():
    entries = provenance.sidecar()
    problems = []
    files = provenance.result_files()
    assert len(files) > 40
    for path in files:
        got = provenance.resolve(path, entries)
        rel = path.relative_to(provenance.RESULTS).as_posix()
        for field in provenance.FIELDS:
            if field not in got:
                problems.append(f"{rel}: no {field}")
            elif why := check_field(field, got[field]):
                problems.append(f"{rel}: {why}")
    assert not problems, "\n".join(problems)


def test_sidecar_entries_are_for_real_files_and_never_override_the_file():
    entries = provenance.sidecar()
    for rel, entry in entries.items():
        path = provenance.RESULTS / rel
        assert path.is_file(), f"PROVENANCE.json names {rel}, which does not exist"
        assert set(entry) <= set(provenance.FIELDS) | {"derived_from", "note"}, rel
        own = provenance.stated(path)
        assert not set(own) & set(entry), f"{rel}: PROVENANCE.json repeats fields the file states itself"
        for src in entry.get("derived_from", []):
            assert (provenance.RESULTS / src).is_file(), f"{rel}: source {src} does not exist"
        if any(v in (provenance.NOT_RECORDED, provenance.NOT_USED) for v in entry.values() if isinstance(v, str)):
            assert entry.get("note"), f"{rel}: a 'not recorded' / 'not used' field needs a note saying what is known"


def test_the_checker_refuses_vague_or_missing_values():
    assert check_field("command", "not recorded") is None
    assert check_field("command", "Not recorded (lost)") is not None
    assert check_field("device", "unknown") is not None
    assert check_field("date", "yesterday") is not None
    assert check_field("jax", "0.11") is not None
    assert check_field("jax", "0.10.2; 0.11.2") is None
    assert check_field("jax", "not used") is None and check_field("device", "not used") is not None


def test_a_file_of_several_runs_states_what_its_runs_state(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "SIDECAR", tmp_path / "PROVENANCE.json")
    runs = tmp_path / "runs.json"
    runs.write_text('{"a": {"device": "X", "jax_version": "0.11.2", "command": "run a"}, '
                    '"b": {"device": "X", "jax": "0.11.2", "command": "run b"}}')
    assert provenance.stated(runs) == {"device": "X", "jax": "0.11.2", "command": "run a; run b"}
    mixed = tmp_path / "mixed.json"
    mixed.write_text('{"device": "Y", "a": {"device": "X", "command": "run a"}}')
    assert provenance.stated(mixed) == {"device": "Y"}  # a file that states fields itself is not a list of runs
