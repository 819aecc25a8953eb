"""Training augmentation: geometry and colour are right, draws are seeded per episode, and only training
episodes are ever augmented."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_resume_from_episode_4_is_exact, quick_recipe

from fsltool.checkpoint import load_checkpoint
from fsltool.data import augment
from fsltool.data.augment import AugmentConfig, augment_images, episode_generator
from fsltool.errors import FsltoolError
from fsltool.recipe import validate
from fsltool.train import meta_train


def parameters(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_identity_settings_leave_images_unchanged() -> None:
    images = torch.rand(6, 3, 20, 20)
    config = AugmentConfig(kind="natural", crop_scale=1.0, flip=False, color_jitter=0.0)
    torch.testing.assert_close(augment_images(images, config, episode_generator(0, 1, 0)), images, atol=1e-5, rtol=0)
    glyph = AugmentConfig(kind="glyph", rotation=0.0, scale=0.0, shift=0.0)
    torch.testing.assert_close(augment_images(images[:, :1], glyph, episode_generator(0, 1, 0)), images[:, :1], atol=1e-5, rtol=0)


def test_flip_mirrors_exactly_the_images_it_picks() -> None:
    images = torch.rand(40, 3, 8, 8)
    out = augment_images(images, AugmentConfig(kind="natural", crop_scale=1.0, color_jitter=0.0), episode_generator(0, 1, 0))
    mirrored = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, images)]
    unchanged = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, images)]
    assert all(m or u for m, u in zip(mirrored, unchanged)) and 5 < sum(mirrored) < 35


def test_natural_augmentation_varies_stays_in_range_and_repeats_with_its_seed() -> None:
    images = torch.rand(10, 3, 32, 32)
    config = AugmentConfig(kind="natural")
    first = augment_images(images, config, episode_generator(3, 7, 1))
    assert first.shape == images.shape and first.min() >= 0 and first.max() <= 1
    assert not torch.allclose(first, images, atol=1e-3)
    torch.testing.assert_close(first, augment_images(images, config, episode_generator(3, 7, 1)), atol=0, rtol=0)
    assert not torch.allclose(first, augment_images(images, config, episode_generator(3, 7, 2)))


def _padded_shift(augmented: torch.Tensor, image: torch.Tensor, pixels: int) -> tuple[int, int, bool] | None:
    """The (dx, dy, mirrored) for which ``augmented`` is ``image`` moved by whole pixels with zeros let in, if any."""
    height, width = image.shape[-2:]
    for mirrored in (False, True):
        source = image.flip(-1) if mirrored else image
        padded = torch.nn.functional.pad(source, (pixels, pixels, pixels, pixels))
        for dy in range(-pixels, pixels + 1):
            for dx in range(-pixels, pixels + 1):
                crop = padded[:, pixels + dy : pixels + dy + height, pixels + dx : pixels + dx + width]
                if torch.equal(crop, augmented):
                    return dx, dy, mirrored
    return None


def test_padded_crop_is_a_whole_pixel_shift_with_zeros_let_in() -> None:
    """RFS's RandomCrop(32, padding=4): every image is itself (or its mirror) moved by at most 4 whole pixels each
    way, exactly (pixel values copied, not interpolated), and the draws cover shifts in both directions."""
    images = torch.rand(60, 3, 32, 24) + 0.01  # no zero pixels: zeros in the output can only be padding
    config = AugmentConfig(kind="padded", padding=0.125, color_jitter=0.0)
    out = augment_images(images, config, episode_generator(0, 1, 0))
    shifts = [_padded_shift(o, i, 4) for o, i in zip(out, images)]
    assert None not in shifts
    assert {dx for dx, _, _ in shifts} >= {-3, 3} and {dy for _, dy, _ in shifts} >= {-3, 3}  # x and y drawn apart
    assert 10 < sum(mirrored for _, _, mirrored in shifts) < 50


def test_bad_augment_values_name_the_key() -> None:
    recipe = quick_recipe(Path("d.h5"), Path("out"))
    recipe.train.augment = AugmentConfig(kind="photos")
    with pytest.raises(FsltoolError, match="'train.augment.kind': 'photos' is not one of none, natural, padded, glyph"):
        validate(recipe)
    recipe.train.augment = AugmentConfig(kind="natural", crop_scale=0.0)
    with pytest.raises(FsltoolError, match=r"'train.augment.crop_scale' must be in \[0.01, 1\], got 0.0"):
        validate(recipe)
    recipe.train.augment = AugmentConfig(kind="padded", padding=0.6)
    with pytest.raises(FsltoolError, match=r"'train.augment.padding' must be in \[0, 0.5\], got 0.6"):
        validate(recipe)


def test_only_training_episodes_are_augmented(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every augmented batch is one training episode (10w1s5q: 60 images); validation's stored episodes never are."""
    calls: list[int] = []
    original = augment.augment_images

    def recording(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
        calls.append(images.shape[0])
        return original(images, config, generator)

    monkeypatch.setattr(augment, "augment_images", recording)
    recipe = quick_recipe(synthetic_file, tmp_path / "run", episodes=4, meta_batch=2)
    recipe.train.augment = AugmentConfig(kind="glyph")
    meta_train(recipe, quiet=True)
    assert calls == [60] * 8


def test_augmented_run_resumes_exactly(synthetic_file: Path, tmp_path: Path) -> None:
    recipes = {}
    for name in ("straight", "resumed"):
        recipes[name] = quick_recipe(synthetic_file, tmp_path / name, episodes=8, keep_checkpoints=2)
        recipes[name].train.augment = AugmentConfig(kind="glyph")
    meta_train(recipes["straight"], quiet=True)
    assert_resume_from_episode_4_is_exact(recipes["resumed"], tmp_path / "straight")
    straight = parameters(tmp_path / "straight")
    plain = quick_recipe(synthetic_file, tmp_path / "plain", episodes=8)
    meta_train(plain, quiet=True)
    assert any(not torch.equal(straight[key], parameters(tmp_path / "plain")[key]) for key in straight)


def test_class_rotation_turns_each_class_as_one_by_quarter_turns() -> None:
    """MAML++'s Omniglot augmentation: every image of a class (support and query) turned by the same multiple of
    90 degrees, exactly; the classes' turns are drawn apart and repeat with the episode's seed."""
    from fsltool.data.augment import augment_episode
    from fsltool.data.episodes import Episode, EpisodeShape

    shape = EpisodeShape(20, 2, 3)
    support_labels, query_labels = (torch.arange(20).repeat_interleave(n) for n in (2, 3))
    episode = Episode(torch.rand(40, 1, 9, 9), support_labels, torch.rand(60, 1, 9, 9), query_labels, shape)
    config = AugmentConfig(kind="class_rot90")
    out = augment_episode(episode, config, episode_generator(0, 3, 1))
    assert torch.equal(out.support_labels, support_labels) and torch.equal(out.query_labels, query_labels)
    turns = {}
    for images, rotated, labels in ((episode.support, out.support, support_labels), (episode.query, out.query, query_labels)):
        for image, turned, label in zip(images, rotated, labels.tolist()):
            quarter = next(k for k in range(4) if torch.equal(torch.rot90(image, k, dims=(-2, -1)), turned))
            assert turns.setdefault(label, quarter) == quarter  # one turn per class
    assert set(turns.values()) == {0, 1, 2, 3}
    again = augment_episode(episode, config, episode_generator(0, 3, 1))
    assert torch.equal(again.support, out.support) and torch.equal(again.query, out.query)


def test_class_rotation_is_refused_where_it_cannot_apply(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretraining batches have no episode classes, and quarter turns keep only square images: both refused before
    any run folder is written."""
    from fsltool import train
    from fsltool.data.augment import check_augment, check_augment_fits
    from fsltool.data.store import FewShotData

    with pytest.raises(FsltoolError, match=r"'pretrain.augment.kind': class_rot90 turns the classes of episodes"):
        check_augment(AugmentConfig(kind="class_rot90"), "r.yaml", "pretrain")
    check_augment(AugmentConfig(kind="class_rot90"), "r.yaml", "train")
    with pytest.raises(FsltoolError, match=r"^d.h5: recipe key 'train.augment.kind': class_rot90 needs square images, these are 28x32$"):
        check_augment_fits(AugmentConfig(kind="class_rot90"), (3, 28, 32), "d.h5")
    check_augment_fits(AugmentConfig(kind="class_rot90"), (1, 28, 28), "d.h5")
    recipe = quick_recipe(synthetic_file, tmp_path / "run", episodes=2)
    recipe.train.augment = AugmentConfig(kind="class_rot90")
    meta_train(recipe, quiet=True)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()

    opened = train.open_for_run

    def wide(*args: object) -> FewShotData:  # the same data, seen as 28x32 images
        data = opened(*args)
        data.image_shape = (*data.image_shape[:-2], 28, 32)
        return data

    monkeypatch.setattr(train, "open_for_run", wide)
    recipe = quick_recipe(synthetic_file, tmp_path / "wide", episodes=2)
    recipe.train.augment = AugmentConfig(kind="class_rot90")
    with pytest.raises(FsltoolError, match="class_rot90 needs square images, these are 28x32"):
        meta_train(recipe, quiet=True)
    assert not (tmp_path / "wide").exists()
