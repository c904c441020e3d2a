"""Stage artefacts: a matching manifest skips the stage; a changed config or input, or a missing one, reruns it."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_the_code_that_made_a_stage_is_part_of_its_fingerprint(tmp_path: Path, monkeypatch) -> None:
    from raypipe import artifacts

    calls: list[str] = []
    first = ArtifactStore(tmp_path).run(0, "a", None, [], _stage(calls, "a"))
    assert first.manifest["code"] == artifacts.code_version()
    ArtifactStore(tmp_path).run(0, "a", None, [], _stage(calls, "a"))
    assert calls == ["a"], "the same code skips"
    monkeypatch.setattr(artifacts, "code_version", lambda: "0.1.0+000000000000")
    ArtifactStore(tmp_path).run(0, "a", None, [], _stage(calls, "a"))
    assert calls == ["a", "a"], "other code reruns"


def test_the_source_digest_covers_python_and_yaml_files_by_content(tmp_path: Path) -> None:
    import os
    import shutil

    import raypipe
    from raypipe.artifacts import source_digest

    package = tmp_path / "raypipe"
    shutil.copytree(Path(raypipe.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = source_digest(package)
    os.utime(package / "artifacts.py", ns=(1, 1))
    (package / "notes.txt").write_text("not code")
    assert source_digest(package) == before, "timestamps and other files do not count"
    examples = package / "lema" / "examples.yaml"
    examples.write_text(examples.read_text() + "\n# an edit\n")
    assert source_digest(package) != before


def _model(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text('{"vocab": {}}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_a_user_model_enters_fingerprints_by_content_not_path(tmp_path: Path, monkeypatch) -> None:
    """Weights rewritten in place rerun the stage; the same weights under another path reuse it."""
    import shutil

    from raypipe.config import ModelConfig
    from raypipe.data_config import ModelCallConfig
    from raypipe.fingerprint import fingerprint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = _model(tmp_path / "model", b"weights v1")
    calls: list[str] = []

    def run(path: Path) -> None:
        ArtifactStore(tmp_path / "run").run(0, "init", ModelConfig(path=str(path)), [], _stage(calls, "init"))

    run(model)
    run(model)
    assert calls == ["init"]
    (model / "model.safetensors").write_bytes(b"weights v2")
    run(model)
    assert calls == ["init", "init"], "new weights under the same path rerun the stage"
    shutil.copytree(model, tmp_path / "moved")
    run(tmp_path / "moved")
    assert calls == ["init", "init"], "the same files under another path are the same model"
    local = lambda path: fingerprint(ModelCallConfig(backend="local", model=str(path)))
    assert local(model) == local(tmp_path / "moved")
    (tmp_path / "moved" / "config.json").write_text('{"model_type": "qwen2"}')
    assert local(model) != local(tmp_path / "moved")
    served = lambda name: fingerprint(ModelCallConfig(model=name))
    assert served("raypipe") != served("other"), "a served model's name is not a directory: it counts as written"


def test_an_unchanged_weight_file_is_not_hashed_again(tmp_path: Path, monkeypatch) -> None:
    import json
    import os

    from raypipe import files

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = _model(tmp_path / "model", b"weights")
    digest = files.model_digest(model)
    cache = json.loads((tmp_path / "cache" / "raypipe" / "model_hashes.json").read_text())
    entry = cache[str((model / "model.safetensors").resolve())]
    assert (entry["size"], entry["sha256"]) == (7, files.file_sha256(model / "model.safetensors"))

    def no_reading(path: Path) -> str:
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(files, "file_sha256", no_reading)
    assert files.model_digest(model) == digest, "same size and mtime: the cached digest stands"
    os.utime(model / "model.safetensors", ns=(1, 1))  # rewritten (same size): a new mtime
    with pytest.raises(AssertionError, match="model.safetensors was read again"):
        files.model_digest(model)


def test_an_atomic_write_that_fails_midway_leaves_the_old_file(tmp_path: Path, monkeypatch) -> None:
    import os

    from raypipe.files import write_atomic

    path = tmp_path / "summary.json"
    write_atomic(path, "old")
    with pytest.raises(UnicodeEncodeError):  # fails while writing: half of it would be on disk with write_text
        write_atomic(path, "new " * 10_000 + "\ud800")
    def disk_gone(*args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", disk_gone)  # fails after writing, before the rename
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_moved_model_skips_init_and_is_used_where_it_is_now(tiny_model_dir: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    import shutil

    from raypipe.config import RunConfig
    from raypipe.pipeline import Pipeline

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved")

    def init(path: Path) -> Pipeline:
        cfg = RunConfig(output_dir=str(tmp_path / "runs"))
        cfg.model.path, cfg.warmup.max_steps = str(path), 0
        pipeline = Pipeline(cfg)
        init = pipeline.init()
        sft = pipeline.sft(pipeline.sft_data(init), init)  # no warm-up: it hands the model on
        assert init.metrics["model_dir"] == sft.metrics["model_dir"] == str(path.resolve())
        return pipeline

    init(tiny_model_dir)
    assert init(moved).store.skipped == ["round_0/init", "round_0/sft_data", "round_0/sft"]


def test_a_data_file_enters_fingerprints_by_content_not_path(tmp_path: Path, monkeypatch) -> None:
    """Rows edited in place rerun the stages built on them; the same file elsewhere reuses them."""
    import shutil

    from raypipe.config import TaskConfig
    from raypipe.fingerprint import fingerprint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    task = lambda path: fingerprint(TaskConfig(source="dataset", train_path=str(path), answer_kind="gsm8k"))
    first = task(data)
    assert task(shutil.copy(data, tmp_path / "copy.jsonl")) == first, "same rows elsewhere: same data"
    data.write_text('{"question": "1+1?", "answer": "#### 3"}\n')
    assert task(data) != first, "rows edited in place: new data"
    folder = tmp_path / "parquet"
    folder.mkdir()
    (folder / "part-0.parquet").write_bytes(b"rows")
    before = task(folder)
    (folder / "part-1.parquet").write_bytes(b"more rows")
    assert task(folder) != before, "a folder counts every file under it"
    assert task("hf:gsm8k:main:train") != task("hf:gsm8k:main:test"), "a hub name is not a path: as written"
