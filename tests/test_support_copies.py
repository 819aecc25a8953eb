"""`evaluate --support-copies N` (RFS's n_aug_support_samples): each support image replaced by N augmented copies,
drawn per image, laid out as the method expects, refused where it cannot apply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fsltool.checkpoint import load_trained
from fsltool.data.augment import AugmentConfig, augmented_copies
from fsltool.data.episodes import EpisodeShape, episode_labels
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.evaluate import SupportCopies, episode_scores, evaluate
from fsltool.pretrain import pretrain
from tests.conftest import run_cli
from tests.test_pretrain import pretrain_recipe

SHIFTS = AugmentConfig(kind="padded", padding=0.15, flip=True, color_jitter=0.3)
IDENTITY = AugmentConfig(kind="padded", padding=0.0, flip=False, color_jitter=0.0)


def test_each_images_copies_depend_on_its_index_alone() -> None:
    images = torch.rand(4, 1, 28, 28)
    indices = np.array([7, 3, 11, 5])
    copies = augmented_copies(images, indices, 3, SHIFTS)
    assert copies.shape == (12, 1, 28, 28)
    alone = augmented_copies(images[2:3], indices[2:3], 3, SHIFTS)  # image 11 with no others
    torch.testing.assert_close(copies[6:9], alone, rtol=0, atol=0)
    assert not torch.equal(copies[6], copies[7])  # the copies of one image differ
    other_index = augmented_copies(images[2:3], np.array([12]), 3, SHIFTS)
    assert not torch.equal(alone, other_index)
    torch.testing.assert_close(augmented_copies(images, indices, 2, IDENTITY), images.repeat_interleave(2, 0), rtol=0, atol=0)


def test_identical_copies_leave_prototypes_and_scores_unchanged(trained_run: Path, synthetic_file: Path) -> None:
    """Two unaugmented copies of each support image give ProtoNet the same prototypes: this holds only if the
    copies' embeddings and the repeated labels are laid out alike."""
    method = load_trained(trained_run).method
    shape = EpisodeShape(5, 5, 5)
    with FewShotData(synthetic_file) as data:
        support, query = data.stored_episodes("test", shape)
        plain = episode_scores(method, data, shape, support[:8], query[:8])
        copied = episode_scores(method, data, shape, support[:8], query[:8], copies=SupportCopies(2, IDENTITY))
    torch.testing.assert_close(copied, plain, rtol=1e-5, atol=1e-4)


def test_scores_are_those_of_the_augmented_support_set(trained_run: Path, synthetic_file: Path) -> None:
    """Episode by episode, by hand: the copies of augmented_copies embedded eagerly, labels repeated copy by copy."""
    method = load_trained(trained_run).method.eval()
    shape = EpisodeShape(5, 1, 5)
    copies = SupportCopies(3, SHIFTS)
    with FewShotData(synthetic_file) as data:
        support, query = data.stored_episodes("test", shape)
        scores = episode_scores(method, data, shape, support[:6], query[:6], copies=copies)
        first_three = episode_scores(method, data, shape, support[:3], query[:3], copies=copies)
        labels = episode_labels(shape)[0]
        with torch.no_grad():
            for e in range(6):
                augmented = augmented_copies(data.images(support[e], torch.device("cpu")), support[e], 3, SHIFTS)
                per_image = method.embed(augmented).view(len(support[e]), 3, -1)
                copy_major = per_image.transpose(0, 1).reshape(3 * len(support[e]), -1)
                expected = method.scores_from_embeddings(copy_major[None], labels.repeat(3)[None],
                                                         method.embed(data.images(query[e], torch.device("cpu")))[None], shape.way)[0]
                torch.testing.assert_close(scores[e], expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(first_three, scores[:3], rtol=0, atol=0)  # the same copies whatever else is evaluated
    with FewShotData(synthetic_file) as data:
        plain = episode_scores(method, data, shape, support[:6], query[:6])
    assert not torch.allclose(plain, scores, atol=1e-3)  # the copies were used, not the images


def test_one_inference_copy_embeds_the_support_copies_and_the_queries(trained_run: Path, synthetic_file: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracing and freezing the network is the costly part of a short evaluation: done once, not once per image set."""
    import fsltool.evaluate as evaluation

    made: list[torch.Size] = []

    def counted(network: torch.nn.Module, example: torch.Tensor):
        made.append(example.shape)
        return evaluation.inference_copy(network, example)

    monkeypatch.setitem(evaluation.RUNTIMES, "torch", counted)
    method = load_trained(trained_run).method
    shape = EpisodeShape(5, 1, 5)
    with FewShotData(synthetic_file) as data:
        support, query = data.stored_episodes("test", shape)
        episode_scores(method, data, shape, support[:4], query[:4], copies=SupportCopies(3, SHIFTS))
    assert len(made) == 1


def test_methods_that_cannot_take_copies_are_refused(trained_run: Path, synthetic_file: Path) -> None:
    from fsltool.methods import build_method

    method = build_method("matchingnet", load_trained(trained_run).method.backbone, {"fce": True})  # embeds per episode
    with FewShotData(synthetic_file) as data, pytest.raises(FsltoolError, match="--support-copies: method 'matchingnet' does not take"):
        evaluate(method, data, "test", EpisodeShape(5, 1, 5), episodes=2, support_copies=SupportCopies(2, SHIFTS))
    with FewShotData(synthetic_file) as data, pytest.raises(FsltoolError, match="does not go with --support-copies"):
        evaluate(load_trained(trained_run).method, data, "test", EpisodeShape(5, 1, 5), episodes=2,
                 query_batch_statistics=True, support_copies=SupportCopies(2, SHIFTS))


def test_cli_augments_as_the_run_pretrained_and_records_it(synthetic_file: Path, tmp_path: Path) -> None:
    pretrain(pretrain_recipe(synthetic_file, tmp_path / "pre", epochs=1, augment=SHIFTS), quiet=True)
    base = ["evaluate", str(tmp_path / "pre"), "--shape", "5w1s5q", "--episodes", "6", "--method", "logistic"]
    code, out, err = run_cli(*base, "--support-copies", "3", "--json", "-")
    assert code == 0, err
    result = json.loads(out)
    assert result["support_copies"] == 3 and result["support_augment"]["kind"] == "padded"
    assert result["support_augment"]["padding"] == SHIFTS.padding and 20 < result["accuracy"] <= 100
    code, out, err = run_cli(*base, "--support-copies", "3")
    assert code == 0 and "support images as 3 augmented copies" in out, err
    code, _, err = run_cli(*base, "--support-copies", "2", "--transductive")
    assert code == 2 and "--support-copies" in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_a_run_with_no_augmentation(trained_run: Path) -> None:
    code, out, err = run_cli("evaluate", str(trained_run), "--support-copies", "5", "--json", "-")
    assert code == 2 and out == ""
    assert "'train.augment.kind' is none" in err and len(err.strip().splitlines()) == 1
