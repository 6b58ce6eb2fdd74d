"""The metric networks' construction: InceptionV3 weights from a local file (and clear errors
for a wrong or missing one), the CLIP scorer's preprocessing and score definition."""
import pytest
import torch
import torch.nn.functional as F

from tatitok_fast.evaluation.clip_score import CLIPScorer
from tatitok_fast.evaluation.inception import InceptionFeatures
from tatitok_fast.weight_files import WeightsFileError


def test_inception_loads_a_local_weights_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    sd = InceptionFeatures("random").net.state_dict()
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    monkeypatch.setenv("TATITOK_FAST_INCEPTION_WEIGHTS", str(path))
    feats = InceptionFeatures(download=False)
    assert feats.weights == str(path) and feats.net.INPUT_IMAGE_SIZE == 299
    got = feats.net.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert not any(p.requires_grad for p in feats.parameters())
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="not InceptionV3 FID weights"):
        InceptionFeatures(str(path), download=False)
    with pytest.raises(WeightsFileError, match="--inception-weights points to"):
        InceptionFeatures(str(tmp_path / "missing.pth"), download=False)


def test_inception_rejects_bad_images():
    with pytest.raises(ValueError, match=r"images: expected \(B, 3, H, W\)"):
        InceptionFeatures("random")(torch.rand(2, 1, 32, 32))


def _tiny_clip():
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg={"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                           "head_width": 16},
                 text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    import open_clip

    return model, open_clip.get_tokenizer("ViT-B-32")


def test_clip_score_is_100_times_clamped_cosine():
    model, tokenizer = _tiny_clip()
    scorer = CLIPScorer.from_open_clip(model, tokenizer)
    images = torch.rand(3, 3, 16, 16)  # the model's size: preprocessing is only the normalisation
    prompts = ["a cat", "a dog", "a car"]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image((images - mean) / std)
        txt = model.encode_text(tokenizer(prompts))
    expected = 100 * F.cosine_similarity(img, txt, dim=-1).clamp_min(0)
    torch.testing.assert_close(scorer(images, prompts), expected, rtol=1e-4, atol=1e-4)
    big = F.interpolate(images, size=(32, 48), mode="nearest")  # resized + centre-cropped back to 16 x 16
    assert scorer(big, prompts).shape == (3,)
    with pytest.raises(ValueError, match="one per image"):
        scorer(images, prompts[:2])


def test_clip_scorer_bad_model_or_weights():
    with pytest.raises(ValueError, match="--clip-score-model"):
        CLIPScorer("no-such-model", "random")
    with pytest.raises(ValueError, match="--clip-score-pretrained"):
        CLIPScorer("ViT-B-32", "no-such-tag")
