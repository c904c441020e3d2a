"""Stage artefacts: a matching manifest skips the stage; a changed config or input, or a missing one, reruns it."""

from __future__ import annotations

from pathlib import Path

from raypipe.artifacts import ArtifactStore, write_rows


def _stage(calls: list[str], name: str):
    def body(out: Path) -> dict:
        calls.append(name)
        return {"rows": write_rows(out, [{"x": 1}, {"x": 2}])}
    return body


def test_resume_skips_matching_stages_and_reruns_changed_ones(tmp_path: Path) -> None:
    calls: list[str] = []
    store = ArtifactStore(tmp_path)
    a = store.run(1, "a", {"k": 1}, [], _stage(calls, "a"))
    b = store.run(1, "b", None, [a], _stage(calls, "b"))
    assert calls == ["a", "b"] and b.rows() == [{"x": 1}, {"x": 2}]
    assert b.manifest["inputs"] == {"round_1/a": a.fingerprint}

    again = ArtifactStore(tmp_path)
    a2 = again.run(1, "a", {"k": 1}, [], _stage(calls, "a"))
    again.run(1, "b", None, [a2], _stage(calls, "b"))
    assert calls == ["a", "b"] and again.skipped == ["round_1/a", "round_1/b"]

    changed = ArtifactStore(tmp_path)
    a3 = changed.run(1, "a", {"k": 2}, [], _stage(calls, "a"))
    changed.run(1, "b", None, [a3], _stage(calls, "b"))
    assert calls == ["a", "b", "a", "b"], "a config change reruns the stage and everything downstream"


def test_a_stage_without_manifest_is_redone(tmp_path: Path) -> None:
    calls: list[str] = []
    ArtifactStore(tmp_path).run(0, "a", None, [], _stage(calls, "a"))
    (tmp_path / "round_0" / "a" / "manifest.json").unlink()  # as if killed before finishing
    store = ArtifactStore(tmp_path)
    store.run(0, "a", None, [], _stage(calls, "a"))
    assert calls == ["a", "a"] and store.executed == ["round_0/a"]


def test_a_sibling_run_with_the_same_fingerprint_is_reused_not_recomputed(tmp_path: Path) -> None:
    calls: list[str] = []
    first = ArtifactStore(tmp_path / "method_a")
    shared = first.run(1, "sample", {"n": 8}, [], _stage(calls, "sample"))
    second = ArtifactStore(tmp_path / "method_b", reuse_from=[tmp_path / "method_a"])
    again = second.run(1, "sample", {"n": 8}, [], _stage(calls, "sample"))
    assert calls == ["sample"] and second.reused == ["round_1/sample"]
    assert again.dir == shared.dir and again.rows() == shared.rows()
    own = second.run(1, "train", None, [again], _stage(calls, "train"))
    assert own.dir == tmp_path / "method_b" / "round_1" / "train"
    assert own.manifest["inputs"] == {"method_a/round_1/sample": shared.fingerprint}
    second.run(1, "sample", {"n": 16}, [], _stage(calls, "sample"))  # a different config is never reused
    assert calls == ["sample", "train", "sample"]


def test_a_stage_built_on_a_deleted_siblings_stage_is_redone(tmp_path: Path) -> None:
    import shutil

    calls: list[str] = []
    ArtifactStore(tmp_path / "a").run(0, "sft", None, [], _stage(calls, "sft"))
    b = ArtifactStore(tmp_path / "b", reuse_from=[tmp_path / "a"])
    b.run(1, "train", None, [b.run(0, "sft", None, [], _stage(calls, "sft"))], _stage(calls, "train"))
    assert calls == ["sft", "train"]
    shutil.rmtree(tmp_path / "a")
    again = ArtifactStore(tmp_path / "b", reuse_from=[tmp_path / "a"])
    again.run(1, "train", None, [again.run(0, "sft", None, [], _stage(calls, "sft"))], _stage(calls, "train"))
    assert calls == ["sft", "train", "sft", "train"], "same fingerprint, but built on an SFT that is gone"
