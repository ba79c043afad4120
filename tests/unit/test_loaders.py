"""The stages' data loading (`magtkd.loaders`): the audio field (whole-clip normalisation, silence for
unreadable audio, the substitution report) and audio batches (docs/METHOD.md §2, §6)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2FeatureExtractor

from helpers import NON_FINITE, utterance_sample, write_float_wav
from IEMOCAP.config import IEMOCAP
from magtkd.artifacts import SubstitutionReport
from magtkd.dataset import load_samples
from magtkd.decoder import decode_audio_isolated
from magtkd.loaders import AudioField, note_problems, SampleDataset
from magtkd.media import MediaError, TARGET_SAMPLE_RATE
from magtkd.pretrained import load_audio_encoder
from magtkd.synthetic.media import index_frame, tone, write_video, write_wav


def test_audio_field_normalises_the_whole_clip_then_keeps_the_head(tmp_path):
    # docs/METHOD.md §2, as the authors: mean/variance of the WHOLE clip, then the first max_samples.
    # A quiet first second and a loud rest make the two orders differ clearly.
    rng = np.random.default_rng(5)
    wave = np.concatenate([0.05 * tone(250, 1.0, 16000)[:, 0], 0.6 * tone(400, 3.0, 16000)[:, 0]])
    wave = wave + 0.01 * rng.standard_normal(len(wave)).astype(np.float32)
    path = tmp_path / "long.wav"
    write_wav(path, wave, 16000)
    full = decode_audio_isolated(path)
    assert full.shape == wave.shape  # the whole clip is decoded
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=TARGET_SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    values, problem = AudioField(extractor, max_samples=8000).load(utterance_sample("test", 0, 0, path))
    assert problem is None and values.shape == (8000,)
    whole = (full - full.mean()) / np.sqrt(full.var() + 1e-7)
    head_only = (full[:8000] - full[:8000].mean()) / np.sqrt(full[:8000].var() + 1e-7)
    assert np.abs(values - whole[:8000]).max() < 1e-4
    assert np.abs(values - head_only).max() > 1.0  # normalising only the kept part would differ


def test_bad_audio_raises_and_audio_field_substitutes_silence(tmp_path, caplog):
    missing = tmp_path / "missing.wav"
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    silent_video = tmp_path / "video_only.mp4"
    write_video(silent_video, (index_frame(i, 48, 64) for i in range(5)), 10, codec="libx264")
    for path, reason in [(missing, "not found"), (corrupt, "cannot open"), (silent_video, "no audio stream")]:
        with pytest.raises(MediaError, match=path.name) as err:
            decode_audio_isolated(path)
        assert reason in err.value.reason and err.value.path == str(path)

    # The audio stages load through AudioField: an unreadable file becomes one second of
    # silence, the problem travels with the batch, and note_problems puts it in the report.
    good = tmp_path / "good.wav"
    write_wav(good, tone(300, 0.25, 16000), 16000)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=TARGET_SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    samples = [utterance_sample("train", 1, 0, corrupt), utterance_sample("train", 1, 1, corrupt),
               utterance_sample("dev", 1, 1, good)]
    dataset = SampleDataset(samples, [AudioField(extractor)])
    items = [dataset[i] for i in range(len(samples))]
    first, problem = items[0]["audio"]
    assert first.dtype == np.float32 and first.shape == (TARGET_SAMPLE_RATE,) and not first.any()
    assert problem[0] == str(corrupt) and "cannot open" in problem[1]
    assert items[2]["audio"][0].shape == (4000,) and items[2]["audio"][1] is None
    assert AudioField(extractor, max_samples=100).load(samples[1])[0].shape == (100,)

    batch = dataset.collate(items)
    assert batch["audio_problems"] == [problem, problem, None]
    assert batch["audio_mask"].sum(-1).tolist() == [TARGET_SAMPLE_RATE, TARGET_SAMPLE_RATE, 4000]
    report = SubstitutionReport()
    with caplog.at_level(logging.WARNING, logger="magtkd"):
        note_problems(batch, dataset, report)
    assert [(s.key, s.path, s.replacement) for s in report.items] == [
        ("train/1_0", str(corrupt), "silence"), ("train/1_1", str(corrupt), "silence")]
    assert all("cannot open" in s.reason for s in report.items)
    assert sum(str(corrupt) in r.getMessage() for r in caplog.records) == 1  # warned once per file
    note_problems(batch, dataset, None)  # no report: nothing to record, no error


def test_audio_field_substitutes_silence_for_non_finite_samples(tmp_path):
    path = tmp_path / "nan.wav"
    wave = tone(300, 0.5, 16000)[:, 0]
    wave[::7] = np.nan
    write_float_wav(path, wave, 16000)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=TARGET_SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    values, problem = AudioField(extractor).load(utterance_sample("test", 0, 0, path))
    assert values.shape == (TARGET_SAMPLE_RATE,) and not values.any()  # one second of silence
    assert problem[0] == str(path) and NON_FINITE in problem[1]


@pytest.fixture(scope="module")
def audio_pair(generated):
    """The stand-in audio encoder (eval mode), and the shortest and longest of a few IEMOCAP clips."""
    model, extractor = load_audio_encoder(generated / "pretrained_model", IEMOCAP.num_classes)
    model.eval()
    samples = load_samples(IEMOCAP, generated / "datasets" / "IEMOCAP")["train"][:12]
    dataset = SampleDataset(samples, [AudioField(extractor)])
    items = [dataset[i] for i in range(len(samples))]
    lengths = [len(item["audio"][0]) for item in items]
    assert max(lengths) - min(lengths) > 1600  # the long clip is at least 0.1 s longer
    return model, dataset, items[int(np.argmin(lengths))], items[int(np.argmax(lengths))]


def test_audio_batches_are_right_padded_with_a_mask(audio_pair):
    _, dataset, short, long = audio_pair
    n, m = len(short["audio"][0]), len(long["audio"][0])
    for order in ([short, long], [long, short]):
        batch = dataset.collate(order)
        i = order.index(short)
        assert batch["audio_values"].shape == (2, m)
        assert torch.equal(batch["audio_values"][i, :n], torch.from_numpy(short["audio"][0]))
        assert batch["audio_mask"][i, :n].all() and not batch["audio_mask"][i, n:].any()
        assert not batch["audio_values"][i, n:].any()
        assert batch["audio_mask"][1 - i].all()


def test_audio_representation_does_not_depend_on_the_batch(audio_pair):
    model, dataset, short, long = audio_pair
    with torch.no_grad():
        alone = dataset.collate([short])
        rep_alone, logits_alone = model.encode(alone)
        for order in ([short, long], [long, short]):
            batch = dataset.collate(order)
            i = order.index(short)
            rep, logits = model.encode(batch)
            assert torch.allclose(rep[i], rep_alone[0], atol=1e-5), (rep[i] - rep_alone[0]).abs().max()
            assert torch.allclose(logits[i], logits_alone[0], atol=1e-5)


class _Numbers(torch.utils.data.Dataset):
    """Items 0..n-1 with the collate `make_loader` expects."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, items: list) -> torch.Tensor:
        return torch.tensor(items)


def test_persistent_workers_keep_every_epochs_shuffle_and_the_generator_state() -> None:
    from magtkd.loaders import each_pass, make_loader

    def epochs(workers: int) -> tuple[list, torch.Tensor]:
        loader = make_loader(_Numbers(10), 3, True, workers, seed=4)
        order = [torch.cat(list(each_pass(loader))).tolist() for _ in range(3)]
        return order, loader.generator.get_state()

    plain, plain_state = epochs(0)
    assert make_loader(_Numbers(10), 3, True, None).num_workers == 0  # the CPU default: no workers
    loader = make_loader(_Numbers(10), 3, True, 2)
    assert loader.persistent_workers and not loader.pin_memory  # pinned memory only for CUDA
    prefetched, prefetched_state = epochs(2)
    assert prefetched == plain and len({tuple(o) for o in plain}) == 3  # three different shuffles, the same
    assert torch.equal(prefetched_state, plain_state)  # so --resume restores the same stream either way


def test_stored_frames_travel_as_uint8_and_are_normalised_on_the_model_as_the_codec_does(tmp_path) -> None:
    from types import SimpleNamespace

    from magtkd.encoders import VideoEncoder
    from magtkd.frames import FrameCodec, frame_file, save_frames
    from magtkd.loaders import VideoField

    processor = SimpleNamespace(crop_size={"height": 4, "width": 5}, rescale_factor=1 / 255,
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    codec = FrameCodec(processor)
    stored = np.random.default_rng(0).integers(0, 256, (2, 8, 3, 4, 5), dtype=np.uint8)
    field = VideoField.__new__(VideoField)  # without the completion record of a real extraction
    field.codec, field.feature_dir = codec, tmp_path
    for i in range(2):
        save_frames(frame_file(tmp_path, "test", f"0_{i}"), stored[i])
    items = [field.load(utterance_sample("test", 0, i, tmp_path / "x.wav")) for i in range(2)]
    batch = field.collate(items)["video_pixels"]
    assert batch.dtype == torch.uint8 and batch.shape == (2, 8, 3, 4, 5)  # a quarter of the fp32 bytes
    backbone = torch.nn.Module()
    backbone.config = SimpleNamespace(hidden_size=8)
    encoder = VideoEncoder(backbone, 3, codec.scale, tuple(codec.mean.flatten().tolist()),
                           tuple(codec.std.flatten().tolist()))
    expected = torch.stack([codec.normalize(stored[i]) for i in range(2)])
    assert torch.equal(encoder.pixels(batch), expected)  # bit for bit what the loader gave before
    assert torch.equal(encoder.pixels(expected), expected)  # float input passes unchanged
    assert "pixel_mean" not in encoder.state_dict()  # the checkpoint's keys are unchanged
