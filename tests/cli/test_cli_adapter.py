"""``reflora inspect`` and ``reflora convert``; the low-rank Frobenius norm against the dense one."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflora
from reflora import LoraAdapter, load_adapter, load_peft, save_adapter, save_tensors
from reflora.cli import main
from reflora.cli.adapter import inspect_path, lowrank_frobenius


@given(R=st.integers(1, 4), I=st.integers(1, 7), O=st.integers(1, 7), s=st.floats(-5, 5),
       seed=st.integers(0, 1000))
def test_lowrank_frobenius_equals_dense_norm(R, I, O, s, seed):
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((R, I)), rng.standard_normal((O, R))
    dense = np.linalg.norm(s * (B @ A))  # the O x I product, formed here only as the oracle
    assert lowrank_frobenius(A, B, s) == pytest.approx(dense, rel=1e-12, abs=1e-12)


def _ads(seed=0, use_rslora=False):
    rng = np.random.default_rng(seed)
    return {"enc.q": LoraAdapter.from_arrays(rng.standard_normal((2, 6)), rng.standard_normal((5, 2)), alpha=4.0,
                                             use_rslora=use_rslora),
            "enc.v": LoraAdapter.from_arrays(rng.standard_normal((3, 6)), rng.standard_normal((4, 3)), alpha=6.0,
                                             use_rslora=use_rslora)}


def test_inspect_reports_every_module(tmp_path, capsys):
    ads = _ads(use_rslora=True)
    p = tmp_path / "m.safetensors"
    save_adapter(p, ads, layout="seed")
    assert main(["inspect", str(p)]) == 0
    text = capsys.readouterr().out
    assert "layout: seed (from reflora metadata)" in text
    assert "enc.q.lora_a" in text and "(6, 2)" in text and "F64" in text
    assert "parameters: 52" in text
    summary = inspect_path(str(p), out=io.StringIO())
    for m, ad in ads.items():
        row = summary[m]
        assert (row["rank"], row["alpha"], row["scale"], row["params"]) == (ad.config.rank, ad.config.alpha,
                                                                            ad.scale, ad.num_params())
        assert row["norm_A"] == pytest.approx(np.linalg.norm(ad.A), rel=1e-14)
        assert row["norm_B"] == pytest.approx(np.linalg.norm(ad.B), rel=1e-14)
        assert row["norm_sBA"] == pytest.approx(np.linalg.norm(ad.scale * ad.B @ ad.A), rel=1e-12)
    line = next(ln for ln in text.splitlines() if ln.split()[:1] == ["enc.v"])
    assert f" {ads['enc.v'].scale:g} " in line  # rsLoRA scale 6/sqrt(3)


def test_inspect_bare_file_and_directory(tmp_path, capsys):
    rng = np.random.default_rng(1)
    p = tmp_path / "bare.safetensors"
    save_tensors(p, {"lora_a": rng.standard_normal((16, 4)), "lora_b": rng.standard_normal((4, 8))})
    assert main(["inspect", str(p)]) == 0
    text = capsys.readouterr().out
    assert "detected from names and shapes" in text and "alpha: unknown" in text
    summary = inspect_path(str(p), alpha=16.0, out=io.StringIO())
    assert summary[""]["scale"] == 4.0
    d = tmp_path / "dir"
    reflora.save_peft(d, _ads())
    assert main(["inspect", str(d)]) == 0
    assert "PEFT directory" in capsys.readouterr().out
    sq = tmp_path / "square.safetensors"
    save_tensors(sq, {"lora_a": np.ones((3, 3)), "lora_b": np.ones((3, 3))})
    assert main(["inspect", str(sq)]) == 2
    assert "layout='seed'" in capsys.readouterr().err
    assert main(["inspect", str(sq), "--layout", "seed", "--alpha", "3"]) == 0


def test_convert_round_trips(tmp_path, capsys):
    ads = _ads(2)
    src = tmp_path / "src.safetensors"
    save_adapter(src, ads, layout="peft")
    assert main(["convert", str(src), str(tmp_path / "s.safetensors"), "--to", "seed"]) == 0
    assert main(["convert", str(tmp_path / "s.safetensors"), str(tmp_path / "pdir"), "--to", "peft"]) == 0
    assert main(["convert", str(tmp_path / "pdir"), str(tmp_path / "p.safetensors"), "--to", "peft"]) == 0
    capsys.readouterr()
    for back in (load_adapter(tmp_path / "s.safetensors", xp="numpy"), load_peft(tmp_path / "pdir", xp="numpy"),
                 load_adapter(tmp_path / "p.safetensors", xp="numpy")):
        for m, ad in ads.items():
            assert back[m].config == ad.config
            np.testing.assert_array_equal(back[m].A, ad.A)
            np.testing.assert_array_equal(back[m].B, ad.B)
    # refuses to overwrite without --force; bare sources need --alpha
    assert main(["convert", str(src), str(tmp_path / "s.safetensors"), "--to", "seed"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "s.safetensors"), "--to", "seed", "--force"]) == 0
    rng = np.random.default_rng(3)
    bare = tmp_path / "bare.safetensors"
    a, b = rng.standard_normal((8, 2)), rng.standard_normal((2, 5))
    save_tensors(bare, {"lora_a": a, "lora_b": b})
    assert main(["convert", str(bare), str(tmp_path / "b.safetensors"), "--to", "peft"]) == 2
    assert "alpha" in capsys.readouterr().err
    assert main(["convert", str(bare), str(tmp_path / "b.safetensors"), "--to", "peft", "--alpha", "4",
                 "--module", "fc"]) == 0
    got = load_adapter(tmp_path / "b.safetensors", xp="numpy")
    np.testing.assert_array_equal(got.A, a.T)
    assert got.scale == 2.0
    assert set(reflora.load_tensors(tmp_path / "b.safetensors")[0]) == {"base_model.model.fc.lora_A.weight",
                                                                         "base_model.model.fc.lora_B.weight"}


def test_inspect_flags_dora_and_lora_bias(tmp_path, capsys):
    rng = np.random.default_rng(4)
    A, B = rng.standard_normal((2, 6)), rng.standard_normal((4, 2))
    reflora.save_peft(tmp_path, {"fc": LoraAdapter.from_arrays(A, B, alpha=2.0, magnitude=np.ones(4))})
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "fc: also has magnitude (O,)" in text and "parameters: 24" in text


def test_convert_keeps_the_module_path_of_a_single_module_file(tmp_path, capsys):
    rng = np.random.default_rng(8)
    ad = LoraAdapter.from_arrays(rng.standard_normal((2, 6)), rng.standard_normal((5, 2)), alpha=4.0)
    src = tmp_path / "one.safetensors"
    save_adapter(src, {"layers.0.q_proj": ad}, layout="peft")
    assert main(["convert", str(src), str(tmp_path / "pdir"), "--to", "peft"]) == 0
    assert main(["convert", str(src), str(tmp_path / "again.safetensors"), "--to", "peft"]) == 0
    back = load_peft(tmp_path / "pdir", xp="numpy")
    assert list(back) == ["layers.0.q_proj"]
    np.testing.assert_array_equal(back["layers.0.q_proj"].A, ad.A)
    assert set(reflora.load_tensors(tmp_path / "again.safetensors")[0]) == {
        "base_model.model.layers.0.q_proj.lora_A.weight", "base_model.model.layers.0.q_proj.lora_B.weight"}
    # the seed layout stores bare lora_a/lora_b: --module names the module when converting back
    assert main(["convert", str(src), str(tmp_path / "seed.safetensors"), "--to", "seed"]) == 0
    assert main(["convert", str(tmp_path / "seed.safetensors"), str(tmp_path / "p2"), "--to", "peft",
                 "--module", "layers.0.q_proj"]) == 0
    assert list(load_peft(tmp_path / "p2", xp="numpy")) == ["layers.0.q_proj"]
    # an existing plain file where a PEFT directory should go: a message, not a traceback
    (tmp_path / "taken").write_text("x")
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "taken"), "--to", "peft"]) == 2
    assert "taken" in capsys.readouterr().err
