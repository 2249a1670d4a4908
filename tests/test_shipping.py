"""Adapter shipping (`--ship-adapters`) bookkeeping without Ray: what the driver reads and puts in the
object store, what each worker is sent (once), and the worker's local copy."""

from __future__ import annotations

import os
import subprocess
import sys

from loracli.adapters import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME
from loracli.cluster.shipping import (
    INBOX_PREFIX,
    OWNER_FILE,
    AdapterInbox,
    AdapterShipper,
    adapter_files,
    remove_orphans,
)


class FakeRay:
    """`put` returns a reference: the index of the object."""

    def __init__(self):
        self.objects: list[dict] = []

    def put(self, obj):
        self.objects.append(obj)
        return len(self.objects) - 1


def make_adapters(root):
    for name, weights in (("a", SAFETENSORS_NAME), ("b", SAFETENSORS_NAME), ("old", PICKLE_NAME)):
        (root / name).mkdir()
        (root / name / CONFIG_NAME).write_bytes(b"{}" * 10)
        (root / name / weights).write_bytes(name.encode() * 100)
        (root / name / "README.md").write_text("not needed to load")
    (root / "both").mkdir()
    (root / "both" / SAFETENSORS_NAME).write_bytes(b"s" * 7)
    (root / "both" / PICKLE_NAME).write_bytes(b"p" * 7)
    (root / "not-a-folder.txt").write_text("x")
    return root


def test_only_the_files_loading_reads_are_shipped(tmp_path):
    root = make_adapters(tmp_path)
    assert set(adapter_files(root / "a")) == {CONFIG_NAME, SAFETENSORS_NAME}
    assert set(adapter_files(root / "old")) == {CONFIG_NAME, PICKLE_NAME}
    assert adapter_files(root / "both") == {SAFETENSORS_NAME: b"s" * 7}  # no config: loading will say so


def test_each_adapter_is_read_and_put_once_and_sent_to_each_worker_once(tmp_path):
    ray = FakeRay()
    shipper = AdapterShipper(ray, make_adapters(tmp_path), workers=2)
    assert shipper.names == {"a", "b", "old", "both"}
    first = shipper.ship(0, {"a", "b", "unknown"}, live=[0, 1])
    assert set(first) == {"a", "b"} and len(ray.objects) == 2
    assert shipper.ship(0, {"a"}, live=[0, 1]) == {} and shipper.ship(0, set(), live=[0, 1]) == {}
    again = shipper.ship(1, {"a", "old"}, live=[0, 1])
    assert again["a"] == first["a"] and len(ray.objects) == 3  # the same object, put once
    assert set(shipper.refs) == {"b", "old"}  # every live worker has a: the driver let go of it
    size = {n: 20 + 100 * len(n) for n in ("a", "b", "old")}
    assert shipper.bytes_read == size["a"] + size["b"] + size["old"]
    assert shipper.bytes_sent == [size["a"] + size["b"], size["a"] + size["old"]]
    assert shipper.sent == [{"a", "b"}, {"a", "old"}]
    assert ray.objects[first["a"]] == {CONFIG_NAME: b"{}" * 10, SAFETENSORS_NAME: b"a" * 100}
    assert set(shipper.ship(1, {"b"}, live=[1])) == {"b"} and "b" not in shipper.refs  # worker 0 died


def test_the_inbox_knows_every_name_first_and_holds_what_it_received(tmp_path):
    inbox = AdapterInbox(["a", "b"], shown_as="/shared/adapters")
    try:
        assert sorted(p.name for p in inbox.folder.iterdir() if p.is_dir()) == ["a", "b"]
        assert not any((inbox.folder / "a").iterdir())
        inbox.receive({"a": {CONFIG_NAME: b"{}", SAFETENSORS_NAME: b"w"}})
        assert (inbox.folder / "a" / SAFETENSORS_NAME).read_bytes() == b"w"
        message = f"{inbox.folder / 'b' / CONFIG_NAME}: missing"
        assert inbox.shown(message) == f"/shared/adapters/b/{CONFIG_NAME}: missing"
    finally:
        inbox.close()
    assert not inbox.folder.exists()


def test_a_copy_whose_worker_was_killed_is_removed_by_the_next_inbox(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan, alive, unowned = (tmp_path / f"{INBOX_PREFIX}{n}" for n in ("orphan", "alive", "starting"))
    for folder, pid in ((orphan, dead.stdout.strip()), (alive, str(os.getpid())), (unowned, None)):
        (folder / "a").mkdir(parents=True)
        if pid:
            (folder / OWNER_FILE).write_text(pid)
    remove_orphans(tmp_path)
    assert not orphan.exists() and alive.exists() and unowned.exists()  # no owner file yet: being created
