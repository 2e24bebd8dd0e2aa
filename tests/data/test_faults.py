"""Data faults on real files: digits shards written by the project's writer, then emptied, cut or replaced.

Every fault gives its exact count or its one-line error within a time bound (:func:`within`), never a hang.
"""

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from maskdiff.callbacks import DataHealth
from maskdiff.data import (
    DataFault,
    ImageShardsDataModule,
    ResampledTrainStream,
    SkipCounter,
    write_digits_shards,
    write_manifest,
    write_shards,
)
from maskdiff.tools.main import main
from tests.helpers import ROOT, config_in

CUT = "shard unreadable or cut short (ReadError: unexpected end of data)"
NO_MARKER = "shard cut short (no tar end-of-archive marker)"
UNCOUNTED = "; the samples after the cut are uncounted (no manifest.json count)"


@contextlib.contextmanager
def within(seconds: float):
    """Fail with ``TimeoutError`` instead of hanging when the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def written_digits(tmp_path_factory):
    """sklearn's digits written once with the project's writer: 15 train shards and 3 val shards of 100 samples."""
    root = tmp_path_factory.mktemp("digits-shards")
    write_digits_shards(root, samples_per_shard=100)
    return root


@pytest.fixture
def digits(written_digits, tmp_path):
    """A private copy of the digits shards, free to corrupt."""
    return shutil.copytree(written_digits, tmp_path / "digits")


def digits_module(root, **kwargs):
    defaults = dict(
        train_shards=str(root / "digits-train-{000000..000014}.tar"), val_shards=str(root / "digits-val-{000000..000002}.tar"),
        image_size=8, channels=1, num_classes=10, batch_size=16, val_batch_size=50, num_workers=0, shuffle_buffer=0,
    )
    return ImageShardsDataModule(**(defaults | kwargs))


def members(path):
    with tarfile.open(path) as tar:
        return tar.getmembers()


def cut_in_member(path, index):
    """Cut a shard in the middle of the data of its ``index``-th member (2 members a sample: cls, png); returns the
    samples before that member's sample, the ones a reader keeps."""
    member = members(path)[index]
    os.truncate(path, member.offset_data + member.size // 2)
    return index // 2


def cut_in_half(path):
    """Cut a shard at half its size (a block boundary: tarfile ends there without an error); returns the samples a
    reader keeps: those whose members all lie before the cut, less the last one when no partial sample follows it
    (the last sample before a cut is dropped, as its members may be incomplete)."""
    listing = members(path)
    cut = os.path.getsize(path) // 2
    os.truncate(path, cut)
    samples = itertools.groupby(listing, key=lambda m: m.name.split(".")[0])
    spans = [(min(m.offset for m in group), max(m.offset_data + m.size for m in group)) for _, group in
             ((key, list(group)) for key, group in samples)]
    complete = sum(end <= cut for _, end in spans)
    partial = any(start < cut < end for start, end in spans)
    return complete if partial else complete - 1


def zero_byte(path):
    path.write_bytes(b"")


def empty_tar(path):
    with tarfile.open(path, "w"):
        pass


def not_a_tar(path):
    path.write_bytes(b"this is not a tar file\n" * 100)


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)

    def loss(self, batch):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), labels)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch), batch_size=len(batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.loss(batch), batch_size=len(batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    return L.Trainer(**(defaults | kwargs))


# shards that cannot give a sample


@pytest.mark.parametrize("fault, problem", [
    (zero_byte, "is an empty file (0 bytes)"),
    (empty_tar, "is a tar file with no members"),
    (not_a_tar, "is not a tar file (ReadError: invalid header)"),
])
@pytest.mark.parametrize("split, pattern_name, stage", [("train", "train_shards", "fit"), ("val", "val_shards", "validate")])
def test_local_shards_that_give_no_sample_stop_setup_naming_them(digits, fault, problem, split, pattern_name, stage):
    bad = [digits / f"digits-{split}-000001.tar", digits / f"digits-{split}-000002.tar"]
    for path in bad:
        fault(path)
    total = 15 if split == "train" else 3
    with within(10), pytest.raises(ValueError) as error:
        digits_module(digits).setup(stage)
    assert str(error.value) == f"{pattern_name}: 2 of {total} shards cannot be read: {bad[0]} {problem}, {bad[1]} {problem}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_a_shard_without_read_permission_stops_setup(digits):
    path = digits / "digits-train-000004.tar"
    path.chmod(0)
    with within(10), pytest.raises(ValueError, match=re.escape(f"{path} cannot be opened (PermissionError: Permission denied)")):
        digits_module(digits).setup("fit")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_that_reads_no_sample_stops_naming_each_shard(digits, num_workers):
    """Shards read through ``pipe:`` are not checked before the run: the stream stops once every one was read."""
    faults = {"empty.tar": empty_tar, "zero.tar": zero_byte, "text.tar": not_a_tar}
    for name, fault in faults.items():
        fault(digits / name)
    pattern = "::".join(f"pipe:cat {digits / name}" for name in faults)
    module = digits_module(digits, train_shards=pattern, val_shards=None, train_samples_per_epoch=64, num_workers=num_workers)
    with within(30), pytest.raises(DataFault) as error:
        next(iter(module.train_dataloader()))
    message = str(error.value)
    assert re.fullmatch(rf"no sample from train_shards '{re.escape(pattern)}' in \d+ shard reads over [\d.]+ s, none of "
                        r"its 3 shards gives one: .*", message), message
    assert "empty.tar (no samples)" in message
    assert "zero.tar (shard unreadable or cut short (ReadError: empty file))" in message
    assert "text.tar (shard unreadable or cut short (ReadError: invalid header))" in message


def test_training_stops_after_stall_timeout_without_a_sample(digits):
    empty_tar(digits / "empty.tar")
    pattern = "::".join(f"pipe:sleep 0.05; cat {digits / 'empty.tar'} # {k}" for k in range(40))
    module = digits_module(digits, train_shards=pattern, val_shards=None, train_samples_per_epoch=64, stall_timeout=0.5)
    with within(20), pytest.raises(DataFault, match=r"in \d+ shard reads over 0\.\d s, stall_timeout=0.5 s passed; \d+ of 40 shards read"):
        next(iter(module.train_dataloader()))


def test_a_stalled_worker_stops_the_run_after_stall_timeout(digits):
    module = digits_module(digits, train_shards="pipe:exec sleep 9", val_shards=None, train_samples_per_epoch=64,
                           num_workers=1, stall_timeout=1)
    with within(30), pytest.raises(DataFault) as error:
        next(iter(module.train_dataloader()))
    assert str(error.value) == ("no batch of train_shards 'pipe:exec sleep 9' within stall_timeout=1 s: a DataLoader "
                                "worker is stalled reading its shards")


# shards cut short


@pytest.mark.parametrize("cut", ["in a member", "in half"])
@pytest.mark.parametrize("manifest", [True, False])
def test_a_training_shard_cut_short_counts_its_lost_samples(digits, cut, manifest):
    shard = digits / "digits-train-000006.tar"
    kept = cut_in_member(shard, 41) if cut == "in a member" else cut_in_half(shard)
    counter = SkipCounter(name="train")
    stream = ResampledTrainStream([str(shard)], digits_module(digits).make_decoder(train=True), counter, seed=0,
                                  shuffle_buffer=0, shard_counts={str(shard): 100} if manifest else None)
    with within(20):
        labels = [label for _, label in itertools.islice(stream, kept + 1)]  # the first read of the shard, then one
    assert len(labels) == kept + 1 and (counter.read, counter.skipped) == (kept + 1, 100 - kept if manifest else 1)
    fault = CUT if cut == "in a member" else NO_MARKER
    reason = fault if manifest else fault + UNCOUNTED
    assert counter.reasons == {reason: counter.skipped} and counter.examples == {reason: ["digits-train-000006.tar"]}


@pytest.mark.parametrize("manifest, num_workers", [(True, 0), (False, 0), (True, 2)])
def test_a_validation_shard_cut_short_counts_every_lost_sample(digits, manifest, num_workers):
    kept = cut_in_member(digits / "digits-val-000001.tar", 41)
    if not manifest:
        (digits / "manifest.json").unlink()
    module = digits_module(digits, num_workers=num_workers, val_samples=300, train_samples_per_epoch=64)
    module.setup("validate")
    with within(60):
        labels = torch.cat([labels for _, labels in module.val_dataloader()])
    assert (kept, len(labels), module.samples_read, module.skipped) == (20, 220, 220, 80)
    if manifest:
        assert module.skip_reasons == {CUT: 80}
    else:  # one for the cut, at its place; the samples numbered after it shift, and the last 79 are missing
        assert module.skip_reasons == {CUT + UNCOUNTED: 1, "the shards hold fewer samples than val_samples=300": 79}
    assert module.skip_examples[CUT + UNCOUNTED if not manifest else CUT] == ["digits-val-000001.tar"]


# passes over no sample


@pytest.mark.parametrize("run, name", [("validate", "validation"), ("test", "test")])
def test_an_evaluation_pass_over_no_sample_is_an_error_naming_the_split(digits, tmp_path, run, name):
    for shard in range(3):
        cut_in_member(digits / f"digits-val-{shard:06d}.tar", 1)
    module = digits_module(digits)
    pattern = str(digits / "digits-val-{000000..000002}.tar")
    with within(60), pytest.raises(DataFault) as error:
        getattr(trainer(tmp_path), run)(Classifier(), datamodule=module)
    assert str(error.value) == (
        f"the {name} pass over val_shards {pattern!r} read no sample (3 shards: digits-val-000000.tar, "
        f"digits-val-000001.tar, digits-val-000002.tar; 300 skipped so far: {CUT} x300)"
    )


# DataHealth


def test_data_health_prints_one_line_per_reason_with_examples_after_validate_and_test(digits, tmp_path, capsys):
    write_bad = digits / "bad"
    write_bad.mkdir()
    pngs = [{"__key__": f"bad{i}", "png": b"not a png", "cls": 1} for i in range(4)]
    write_shards(pngs, str(write_bad / "bad-%06d.tar"), 4, progress=False)
    write_manifest(write_bad / "manifest.json", {"shards": [{"path": "bad-000000.tar", "samples": 4}]})
    cut_in_member(digits / "digits-val-000001.tar", 41)
    half_kept = cut_in_half(digits / "digits-val-000002.tar")
    pattern = f"{digits}/digits-val-{{000000..000002}}.tar::{write_bad}/bad-000000.tar"
    module = digits_module(digits, val_shards=pattern, val_samples=304, val_batch_size=100)
    runner = trainer(tmp_path, callbacks=[DataHealth(top_k=5)])
    with within(120):
        runner.validate(Classifier(), datamodule=module)
    printed = capsys.readouterr().out.splitlines()
    read = 100 + 20 + half_kept
    skipped = 304 - read
    head = next(i for i, line in enumerate(printed) if line.startswith("maskdiff: data read"))
    assert printed[head] == f"maskdiff: data read {read} samples, skipped {skipped} ({skipped / 304:.2%})"
    lines = printed[head + 1: head + 5]
    expected = [
        (80, CUT, "digits-val-000001.tar"),
        (100 - half_kept, NO_MARKER, "digits-val-000002.tar"),
        (4, "UnidentifiedImageError: cannot identify image file <_io.BytesIO object>", "bad0, bad1, bad2"),
    ]
    assert len([line for line in lines if "e.g." in line]) == 3
    for count, reason, examples in expected:
        assert any(re.fullmatch(rf"\s+{count}  {re.escape(reason)}\s+e\.g\. {examples}", line) for line in lines), (reason, lines)
    with within(120):
        runner.test(Classifier(), datamodule=module)
    assert f"maskdiff: data read {2 * read} samples, skipped {2 * skipped}" in capsys.readouterr().out


# the maskdiff command


def fit_command(tmp_path, train_shards, **data):
    """``maskdiff fit`` arguments: the CPU debug DiT under ``tmp_path`` on ``train_shards`` (8x8 gray, 10 classes)."""
    config, _ = config_in(tmp_path)
    init_args = dict(train_shards=train_shards, image_size=8, channels=1, num_classes=10, batch_size=4, num_workers=0,
                     train_samples_per_epoch=8) | data
    data_config = tmp_path / "data.yaml"
    data_config.write_text(yaml.safe_dump({"data": {"class_path": "maskdiff.data.ImageShardsDataModule", "init_args": init_args}}))
    return ["fit", "--config", str(config), "--config", str(data_config), "--trainer.limit_val_batches", "0"]


def command_env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_fit_on_local_shards_without_samples_stops_before_training(tmp_path):
    shards = [tmp_path / f"empty-{index:06d}.tar" for index in range(2)]
    for shard in shards:
        empty_tar(shard)
    with within(120), pytest.raises(ValueError) as error:
        main(fit_command(tmp_path, str(tmp_path / "empty-{000000..000001}.tar")))
    assert str(error.value) == (f"train_shards: 2 of 2 shards cannot be read: {shards[0]} is a tar file with no members, "
                                f"{shards[1]} is a tar file with no members")


@pytest.mark.slow
def test_fit_on_piped_shards_without_samples_stops_in_one_line(tmp_path):
    """``pipe:`` shards are not checked before training: the run stops once every shard was read without a sample."""
    for index in range(2):
        empty_tar(tmp_path / f"empty-{index:06d}.tar")
    pattern = f"pipe:cat {tmp_path}/empty-{{000000..000001}}.tar"
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "maskdiff.tools.main", *fit_command(tmp_path, pattern)], cwd=tmp_path,
                            env=command_env(), capture_output=True, text=True, timeout=300, check=False)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    message = (rf"no sample from train_shards '{re.escape(pattern)}' in \d+ shard reads over [\d.]+ s, none of its 2 "
               r"shards gives one: empty-00000[01].tar \(no samples\), empty-00000[01].tar \(no samples\)")
    assert re.search(message, result.stderr), result.stderr[-3000:]
    print(f"fit on empty piped shards stopped after {elapsed:.1f} s (process start included)")


def children(pid):
    """Process ids whose parent is ``pid``."""
    found = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in listing.read_text().split()]
    return found


def command_line(pid):
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2]
    return []


def alive(pid):
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_a_run_stalled_on_its_data_at_once(tmp_path, signum):
    """A ``pipe:`` shard whose command never writes stalls the loader in a read; SIGTERM (SLURM's notice) and SIGINT end
    the run within seconds, with a line saying what it waited for, and kill the command."""
    stalled_source = "pipe:exec sleep 117"
    process = subprocess.Popen([sys.executable, "-m", "maskdiff.tools.main", *fit_command(tmp_path, stalled_source)],
                               cwd=tmp_path, env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        reader = None
        while reader is None and time.monotonic() < deadline and process.poll() is None:
            reader = next((pid for pid in children(process.pid) if command_line(pid) == [b"sleep", b"117"]), None)
            time.sleep(0.2)
        assert reader is not None, "the loader never started its pipe"
        time.sleep(1)
        sent = time.monotonic()
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    name = signal.Signals(signum).name
    assert elapsed < 10, elapsed
    assert f"maskdiff: {name} while waiting for train_shards '{stalled_source}': stopping" in stderr, stderr[-3000:]
    assert process.returncode != 0
    assert not alive(reader)
