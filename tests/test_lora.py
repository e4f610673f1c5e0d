"""The LoRA file carries rank and alpha; rendering applies alpha/rank exactly like a manual peft load."""

from __future__ import annotations

import pytest
import torch
from conftest import unet_inputs

from kolora.core.config import ModelConfig
from kolora.formats import interchange, lora
from kolora.models import kolors as models


@pytest.fixture(scope="module")
def trained_lora(tiny_diffusers, tmp_path_factory):
    files = models.resolve(ModelConfig(path=tiny_diffusers))
    unet = models.load_unet(files)
    torch.manual_seed(1)
    lora.add_lora(unet, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():  # B is zero after init: give it values so the adapter changes the output
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    path = lora.save_lora(unet, tmp_path_factory.mktemp("lora") / "pytorch_lora_weights.safetensors", 4, 8.0,
                          ["to_q", "to_k", "to_v", "to_out.0"])
    return files, path


def test_file_carries_rank_and_alpha(trained_lora):
    _, path = trained_lora
    assert interchange.rank_alpha(path) == (4, 8.0)
    meta = lora.read_metadata(path)
    assert meta["kolora.rank"] == "4" and meta["kolora.alpha"] == "8.0"


def test_render_load_applies_alpha_over_rank_like_manual_peft(trained_lora):
    from diffusers import KolorsPipeline
    from peft import LoraConfig, set_peft_model_state_dict

    files, path = trained_lora
    pipe = KolorsPipeline(vae=models.load_vae(files), text_encoder=models.load_text_encoder(files),
                          tokenizer=models.load_tokenizer(files), unet=models.load_unet(files),
                          scheduler=models.make_scheduler(files))
    base_out = pipe.unet(**unet_inputs(pipe.unet)).sample
    interchange.load_into_pipeline(pipe, path)
    loaded_out = pipe.unet(**unet_inputs(pipe.unet)).sample

    def manual(alpha):
        unet = models.load_unet(files)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        res = set_peft_model_state_dict(unet, lora.peft_state_dict(path))
        assert not res.unexpected_keys
        return unet(**unet_inputs(unet)).sample

    expected = manual(8.0)
    assert not torch.allclose(base_out, expected, atol=1e-4), "the adapter must change the output"
    assert torch.allclose(loaded_out, expected, atol=1e-5), (loaded_out - expected).abs().max()
    # The tutorial's mistake (train alpha 4... render alpha 2) gives a different result: alpha matters.
    assert not torch.allclose(loaded_out, manual(4.0), atol=1e-4)


def test_lora_file_is_bit_reproducible(trained_lora, tmp_path):
    import hashlib

    files, path = trained_lora
    unet = models.load_unet(files)
    lora.add_lora(unet, 4, 8.0, ["to_q", "to_k", "to_v", "to_out.0"])
    from peft import set_peft_model_state_dict

    res = set_peft_model_state_dict(unet, lora.peft_state_dict(path))
    assert not res.unexpected_keys
    again = lora.save_lora(unet, tmp_path / "again.safetensors", 4, 8.0, ["to_q", "to_k", "to_v", "to_out.0"])
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()


def test_file_without_alpha_is_refused(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "noalpha.safetensors"
    save_file({"x.lora_A.weight": torch.zeros(2, 2)}, str(p))
    with pytest.raises(lora.LoraFileError, match="--alpha"):
        interchange.rank_alpha(p)
