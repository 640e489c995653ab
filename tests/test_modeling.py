"""KnGPT2 model type, presets and checkpoints, against the dense teacher they come from."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from kninfer.errors import KninferError
from kninfer.kron import KroneckerEmbedding, KroneckerLinear
from kninfer.modeling import KnGPT2Config, KnGPT2ForSequenceClassification, KnGPT2LMHeadModel
from kninfer.modeling.compress import compress, count_parameters
from kninfer.modeling.io import load, save
from kninfer.modeling.presets import kngpt2_spec

IDS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931], [40, 1101, 257, 1295, 13, 50256, 50256, 50256]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def full_rank_spec(tmp_path_factory):
    """kngpt2's shapes at full rank (B is 2x1, so rank 2 is exact): the student must equal the teacher."""
    spec = {"modules": {"transformer.wte": {"m2": 1, "n2": 2, "rank": 2},
                        "transformer.h.*": {"m2": 2, "n2": 1, "rank": 2}}, "tie_head": True}
    path = tmp_path_factory.mktemp("spec") / "full.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_full_rank_student_reproduces_teacher(tiny_teacher, full_rank_spec):
    student, rows = compress(tiny_teacher, full_rank_spec)
    assert isinstance(student.transformer.wte, KroneckerEmbedding)
    assert sum(isinstance(m, KroneckerLinear) for m in student.modules()) == 6 * tiny_teacher.config.n_layer
    assert max(row.error for row in rows) < 1e-5
    assert torch.allclose(logits(student.eval()), logits(tiny_teacher), atol=1e-4)


def test_kngpt2_preset_factors_odd_layers_only(tiny_teacher):
    student, rows = compress(tiny_teacher, "kngpt2", tie_head=False)
    factored = {row.path.split(".")[2] for row in rows if row.path.startswith("transformer.h.")}
    assert factored == {"1", "3"}
    assert isinstance(student.lm_head, torch.nn.Linear)
    assert torch.equal(student.lm_head.weight, tiny_teacher.lm_head.weight)  # dense head from the teacher
    assert torch.equal(student.transformer.h[0].mlp.c_fc.weight, tiny_teacher.transformer.h[0].mlp.c_fc.weight)
    # layer 1's split q equals the nearest Kronecker product of the teacher's q slice
    q = tiny_teacher.transformer.h[1].attn.c_attn.weight[:, :32].T
    layer = student.transformer.h[1].attn.c_attn.q
    assert torch.linalg.norm(layer.to_dense() - q) < torch.linalg.norm(q)
    error = torch.linalg.norm(layer.to_dense() - q) / torch.linalg.norm(q)
    assert rows[1].error == pytest.approx(error.item(), rel=1e-4)


def test_kngpt2_on_gpt2_small_has_paper_size():
    """Paper: 83M. Ours: 83.91M without the untied head; the 0.79M position embeddings make the +1.1%."""
    config = GPT2Config()
    with torch.device("meta"):
        spec = kngpt2_spec(GPT2LMHeadModel(config))
    model = KnGPT2LMHeadModel(KnGPT2Config(kronecker=spec, **config.to_dict()))
    d, v, inner = 768, 50257, 3072
    dense_block = 4 * d + 3 * d * d + 3 * d + d * d + d + inner * d + inner + d * inner + d
    kron_block = (4 * d + 3 * (d * d // 2 + 2 + d) + (d * d // 2 + 2 + d) + (inner * d // 2 + 2 + inner)
                  + (d * inner // 2 + 2 + d))
    expected = v * d // 2 + 2 + 1024 * d + 6 * dense_block + 6 * kron_block + 2 * d
    assert count_parameters(model, include_head=False) == expected
    assert abs(expected - 1024 * d - 83e6) / 83e6 < 0.01
    assert abs(expected - 83e6) / 83e6 < 0.011


def test_tied_head_shares_the_embedding(tiny_teacher):
    student, _ = compress(tiny_teacher, "kngpt2", tie_head=True)
    names = [name for name, _ in student.named_parameters()]
    assert "transformer.wte.A_t" in names and not any(name.startswith("lm_head") for name in names)
    hidden = torch.randn(1, 3, 32)
    E = student.transformer.wte.to_dense()
    assert torch.allclose(student.lm_head(hidden), hidden @ E.T, atol=1e-5)


def test_distil_keeps_every_other_layer(tiny_teacher):
    student, _ = compress(tiny_teacher, "distil")
    assert type(student) is GPT2LMHeadModel and student.config.n_layer == 2
    for new, old in [(0, 0), (1, 2)]:
        for (name, a), (_, b) in zip(student.transformer.h[new].named_parameters(),
                                     tiny_teacher.transformer.h[old].named_parameters(), strict=True):
            assert torch.equal(a, b), name
    # the same computation by hand: the teacher's blocks 0 and 2 only
    with torch.no_grad():
        t = tiny_teacher.transformer
        h = t.wte(IDS) + t.wpe(torch.arange(IDS.shape[1]))
        for i in (0, 2):
            h = t.h[i](h)[0] if isinstance(t.h[i](h), tuple) else t.h[i](h)
        expected = tiny_teacher.lm_head(t.ln_f(h))
    assert torch.allclose(logits(student.eval()), expected, atol=1e-4)


def test_krony_pt_factors_mlp_only_near_target(tiny_teacher):
    dense = count_parameters(tiny_teacher)
    target = dense - 20_000
    student, rows = compress(tiny_teacher, "krony-pt", target_params=target)
    assert {".".join(row.path.split(".")[-2:]) for row in rows} == {"mlp.c_fc", "mlp.c_proj"}
    assert len(rows) == 2 * tiny_teacher.config.n_layer
    assert student.lm_head.weight is student.transformer.wte.weight  # embeddings stay tied, as in Krony-PT
    # no other single MLP factor shape lands nearer the target (brute force over every divisor pair)
    mlp = 2 * 128 * 32 * 4
    sizes = [dense - mlp + 8 * (m1 * n1 + (128 // m1) * (32 // n1)) for m1 in range(1, 129) if 128 % m1 == 0
             for n1 in range(1, 33) if 32 % n1 == 0 and 1 < m1 * n1 < 128 * 32]
    assert abs(count_parameters(student) - target) == min(abs(size - target) for size in sizes)


@pytest.mark.parametrize("suffix", [".pt", ""])
@pytest.mark.parametrize("tie_head", [False, True])
def test_save_load_round_trip(tmp_path, tiny_teacher, gpt2_tokenizer, suffix, tie_head):
    student, _ = compress(tiny_teacher, "kngpt2", tie_head=tie_head)
    out = save(student, tmp_path / f"student{suffix}", gpt2_tokenizer)
    loaded, tokenizer = load(out)
    assert type(loaded) is KnGPT2LMHeadModel
    assert torch.equal(logits(loaded), logits(student.eval()))
    assert tokenizer.decode(tokenizer("Kronecker ⊗ products")["input_ids"]) == "Kronecker ⊗ products"
    if suffix == "":
        assert type(AutoModelForCausalLM.from_pretrained(out)) is KnGPT2LMHeadModel


def test_generate_runs(tiny_teacher):
    student, _ = compress(tiny_teacher, "kngpt2", tie_head=True)
    out = student.eval().generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=50256)
    assert out.shape == (1, 10) and torch.equal(out[:, :4], IDS[:1, :4])
    # greedy with the cache equals greedy without it
    slow = student.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=50256)
    assert torch.equal(out, slow)


def test_sequence_classifier_round_trip(tmp_path, tiny_teacher, tiny_config):
    spec = kngpt2_spec(tiny_teacher)
    fields = {**tiny_config.to_dict(), "id2label": {0: "a", 1: "b", 2: "c"}, "pad_token_id": 50256}
    config = KnGPT2Config(kronecker=spec, **fields)
    model = KnGPT2ForSequenceClassification(config).eval()
    model.config.architectures = ["KnGPT2ForSequenceClassification"]
    out = save(model, tmp_path / "clf.pt")
    loaded, _ = load(out)
    assert type(loaded) is KnGPT2ForSequenceClassification
    assert loaded(IDS).logits.shape == (2, 3)
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this would run",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "kninfer", "config": {}, "state_dict": {}, "x": Evil()}, path)
    with pytest.raises(KninferError, match="refused"):
        load(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint"])
def test_corrupt_and_missing_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(KninferError, match="bad.pt"):
        load(path)
    with pytest.raises(KninferError, match="no such file"):
        load(tmp_path / "missing.pt")
    with pytest.raises(KninferError, match="config.json"):
        load(tmp_path)


def test_compress_cli(tmp_path, tiny_teacher_dir):
    out = tmp_path / "student.pt"
    run = subprocess.run([sys.executable, "-m", "kninfer.cli", "compress", "--teacher", str(tiny_teacher_dir),
                          "--preset", "kngpt2", "--tie-head", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "h.1.attn.c_attn.q" in run.stdout and "parameters:" in run.stdout
    model, tokenizer = load(out)
    assert isinstance(model.transformer.wte, KroneckerEmbedding) and tokenizer is not None
    info = subprocess.run([sys.executable, "-m", "kninfer.cli", "info", str(out)], capture_output=True, text=True)
    assert info.returncode == 0 and "h.3.mlp.c_proj" in info.stdout


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--teacher", "/no/such/dir"], "/no/such/dir"),
    (["--preset", "distil", "--drop", "1"], "preset distil only drops blocks"),
    (["--drop", "99"], "--drop must be between 1 and"),
])
def test_compress_cli_errors(tmp_path, tiny_teacher_dir, args, message):
    base = {"--teacher": str(tiny_teacher_dir), "--preset": "kngpt2", "--out": str(tmp_path / "s.pt")}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    run = subprocess.run([sys.executable, "-m", "kninfer.cli", "compress", *sum(base.items(), ())],
                         capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.pt").exists()


def test_shapes_cli_lists_every_factorisation():
    run = subprocess.run([sys.executable, "-m", "kninfer.cli", "shapes", "12", "8", "--top", "0"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.count("(") == 2]
    assert len(rows) == 22  # 6 x 4 divisor pairs minus the two trivial ones, as test_kron counts
