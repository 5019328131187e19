"""Micro pretraining: deterministic weights, a loadable HF dir with manifest, atomic cache, CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.tinylm import pretrain, tasks
from shared.cli import main as meerkat_main


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread for this module (2-thread OpenMP stalls badly on a shared 2-core box); restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("xdg") / "meerkat-edge" / "tinylm"  # the layout under $XDG_CACHE_HOME
    return pretrain.get_model_dir("micro", seed=3, cache=cache, progress=False)


def test_model_dir_loads_with_auto_classes(built: Path) -> None:
    man = pretrain.read_manifest(built)
    assert man["size"] == "micro" and man["seed"] == 3 and man["steps"] == 20
    assert man["final_loss"] < man["first_loss"]
    assert len(man["corpus_sha256"]) == 64 and man["n_params"] > 0
    assert set(man["zero_shot_accuracy"]) == set(man["tasks"]) == set(tasks.CORPUS_TASKS["core"])
    assert man["corpus"] == "core" and man["device"] == "cpu"
    assert pretrain.model_tasks(built) == tuple(man["tasks"])
    tok = AutoTokenizer.from_pretrained(str(built))
    model = AutoModelForCausalLM.from_pretrained(str(built))
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == man["n_params"]
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert (built / "model.safetensors").is_file()
    ids = torch.tensor([tok.encode("Review: great phone.\nSentiment:")])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_same_recipe_same_weights(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    pretrain.build_model_dir(pretrain.get_spec("micro"), 3, again, progress=False)
    a, b = load_file(str(built / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert pretrain.read_manifest(again)["corpus_sha256"] == pretrain.read_manifest(built)["corpus_sha256"]


def test_init_depends_on_seed_only() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    m1, m2, m3 = (LlamaForCausalLM(cfg) for _ in range(3))
    pretrain.init_weights(m1, 11, 0.02, 1)
    pretrain.init_weights(m2, 11, 0.02, 1)
    pretrain.init_weights(m3, 12, 0.02, 1)
    w1, w2, w3 = (dict(m.named_parameters())["model.layers.0.mlp.up_proj.weight"] for m in (m1, m2, m3))
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    assert abs(float(w1.detach().std()) - 0.02) < 0.003
    assert torch.all(dict(m1.named_parameters())["model.norm.weight"] == 1)


def test_cache_hit_is_instant_and_out_copies(built: Path, tmp_path: Path) -> None:
    cache = built.parent
    before = (built / "model.safetensors").stat().st_mtime_ns
    again = pretrain.get_model_dir("micro", seed=3, cache=cache, progress=False)
    assert again == built and (built / "model.safetensors").stat().st_mtime_ns == before
    out = pretrain.get_model_dir("micro", seed=3, cache=cache, progress=False, out=tmp_path / "copy")
    assert out == tmp_path / "copy"
    assert (out / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="junk"):
        pretrain.get_model_dir("micro", seed=3, cache=cache, progress=False, out=junk)


def test_recipe_hash_and_errors() -> None:
    spec = pretrain.get_spec("micro")
    assert pretrain.recipe_hash(spec, 1) != pretrain.recipe_hash(spec, 2)
    assert pretrain.recipe_hash(spec, 1) == pretrain.recipe_hash(spec, 1)
    with pytest.raises(ValueError, match="huge"):
        pretrain.get_spec("huge")
    with pytest.raises(ValueError, match="device"):
        pretrain.resolve_device("tpu")
    assert pretrain.resolve_device("cpu") == torch.device("cpu")


def _n_params(spec: pretrain.SizeSpec, vocab: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                      num_key_value_heads=spec.heads, tie_word_embeddings=False)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = LlamaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


def test_size_table() -> None:
    """The sizes docs/TINYLM.md promises: parameter ranges for a realistic vocabulary (the generated
    corpora saturate at ~1.9k / ~2.1k tokens, the spec's vocab is the cap), corpus, task set, device."""
    sizes = {name: pretrain.get_spec(name) for name in ("micro", "demo", "small", "medium")}
    assert list(pretrain.SIZES) == list(sizes)
    assert pretrain.get_spec("base") is sizes["medium"]  # the old name still works
    for name, lo, hi in (("demo", 0.8e6, 1.0e6), ("small", 5e6, 10e6), ("medium", 30e6, 60e6)):
        spec = sizes[name]
        for vocab in (1900, spec.vocab):
            assert lo <= _n_params(spec, vocab) <= hi, (name, vocab)
        assert spec.hidden % spec.heads == 0
    assert [s.corpus for s in sizes.values()] == ["core", "core", "rich", "rich"]
    assert pretrain.spec_tasks(sizes["demo"]) == tasks.CORPUS_TASKS["core"]
    assert set(pretrain.spec_tasks(sizes["small"])) == set(tasks.TASKS)
    assert sizes["medium"].device == "auto" and sizes["small"].device == "cpu"
    # CPU budget of small: tokens per step x steps stays what a 2-core box trains in <= 30 min
    assert sizes["small"].steps * sizes["small"].batch * sizes["small"].seq_len <= 2_000_000


def test_check_tasks_finetunes_and_names_unknown_tasks(built: Path) -> None:
    from bench.tinylm import check

    cfg = check.CheckConfig(steps=12, lr=1e-2, batch=8, n_eval=16, seed=1)
    task = tasks.get_task("sentiment")
    model = AutoModelForCausalLM.from_pretrained(str(built))
    tok = AutoTokenizer.from_pretrained(str(built))
    losses = check.finetune(model, tok, task, tasks.make_examples(task, 96, seed=2), cfg)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.5 * losses[0]  # the label words' mass is learned
    [res] = check.check_tasks(built, ["topic"], cfg)
    assert res.task == "topic" and res.n_labels == 4 and res.chance == 0.25 and res.steps == 12
    assert 0 <= res.zero_shot <= 1 and 0 <= res.after <= 1 and res.final_loss < 7
    again = check.check_task(built, "topic", cfg)  # fresh copy of the model, same examples: same numbers
    assert (again.zero_shot, again.after, again.final_loss) == (res.zero_shot, res.after, res.final_loss)
    with pytest.raises(ValueError, match="news8"):
        check.check_tasks(built, ["news8"], cfg)
    with pytest.raises(ValueError, match="steps"):
        check.CheckConfig(steps=-1)


def test_cli_prints_dir_last(built: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(built.parent.parent.parent))
    assert pretrain.cache_root() == built.parent
    assert meerkat_main(["tiny-model", "--size", "micro", "--seed", "3", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(built)
    with pytest.raises(SystemExit, match="unknown tiny-model size"):
        meerkat_main(["tiny-model", "--size", "nope"])


def test_cli_writes_corpus_and_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert meerkat_main(["tiny-model", "--write-corpus", str(tmp_path / "c"), "--docs-per-domain", "5"]) == 0
    assert len(list((tmp_path / "c").glob("*.jsonl"))) == 6
    assert meerkat_main(["tiny-model", "--write-task", "claim", "--task-dir", str(tmp_path / "t"),
                         "--clients", "4", "--alpha", "0.3", "--train", "80", "--eval", "8"]) == 0
    meta = json.loads((tmp_path / "t" / "task.json").read_text())
    assert meta["alpha"] == 0.3 and len(meta["train"]) == 4
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "t")
    with pytest.raises(SystemExit, match="alpha"):
        meerkat_main(["tiny-model", "--write-task", "claim", "--task-dir", str(tmp_path / "u"), "--alpha", "0"])


def test_cli_check_tasks(built: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(built.parent.parent.parent))
    assert meerkat_main(["tiny-model", "--size", "micro", "--seed", "3", "--no-progress", "--check-tasks",
                         "claim,topic", "--check-steps", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(lines[-1])
    assert [r["task"] for r in rows] == ["claim", "topic"] and all(r["steps"] == 3 for r in rows)
    assert lines[0].startswith("claim") and "zero-shot" in lines[0]
    with pytest.raises(SystemExit, match="nli"):
        meerkat_main(["tiny-model", "--size", "micro", "--seed", "3", "--no-progress", "--check-tasks", "nli"])
    with pytest.raises(SystemExit, match="device"):
        meerkat_main(["tiny-model", "--size", "micro", "--seed", "3", "--device", "tpu"])


def test_cli_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        meerkat_main(["tiny-model", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("default: demo)", "default: 100)", "default: 0.001)", "default: 500)", "default: 0.5)", "default: 2000)", "default: 400)"):
        assert default in text
