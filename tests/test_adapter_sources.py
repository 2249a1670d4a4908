"""Adapters where users keep them (`loracli/adapter_sources/`): a manifest mixing local, S3 and Hub sources,
a folder URL, the local cache and offline runs, failures of one source, the security rules, missing extras.

S3 is moto's real S3 API on localhost (`s3_server.py`, the `s3` fixture). The Hub is never contacted:
`fake_hub` writes a repo into a temporary huggingface_hub cache laid out as huggingface_hub lays it out
(`models--org--name/refs/<revision>` holding a commit hash, `snapshots/<commit>/<files>`), points
huggingface_hub at it (`huggingface_hub.constants.HF_HUB_CACHE`) and keeps it offline (`HF_HUB_OFFLINE`);
`snapshot_download` then serves the revision from that cache as it would after a real download.
Results are compared with the same adapters served from a local folder (tokens and logprobs), which
test_engine_vs_peft.py checks against PEFT.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from runs import tiny_engine
from s3_server import s3  # noqa: F401 - the fixture

from loracli.adapter_sources import name_problem, open_catalog
from loracli.adapter_sources import remote as remote_module
from loracli.config import EngineConfig
from loracli.errors import AdapterError, ConfigError
from loracli.requests import parse_object
from loracli.sampling import SamplingParams

ADAPTERS = ("attn4", "mlp8", "all16rs", "pattern")
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """A fresh `$LORACLI_CACHE` and Hub cache per test, the Hub offline, fast retries."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path / "loracli-cache"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(remote_module, "BACKOFF", 0.01)
    monkeypatch.setattr(remote_module, "_unreachable_since", {})  # no store is known to be down yet


def fake_hub(repo: str, files: dict[str, Path], revision: str = "main") -> str:
    """Write `files` ({path in repo: local file}) as a cached snapshot of `repo` at `revision` (module doc)."""
    import huggingface_hub.constants as hf

    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    root = Path(hf.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    for path, src in files.items():
        target = root / "snapshots" / commit / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return commit


def adapter_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {f"{prefix}{p.name}": p for p in folder.iterdir() if p.is_file()}


def requests_for(names, base_names=frozenset()) -> list:
    prompts = ["the quick brown fox", "hello world, how are you", "write a poem about the sea"]
    records = [
        {"id": f"{n}-{i}", "adapter": n, "prompt": p, "logprobs": 2} for n in names for i, p in enumerate(prompts)
    ]
    return [parse_object(r, i + 1, "in.jsonl", base_names) for i, r in enumerate(records)]


def outputs(engine, requests) -> dict:
    """{id: (token ids, logprobs) or the error message}."""
    defaults = SamplingParams(max_tokens=5, ignore_eos=True)
    out = {}
    for r in engine.generate(requests, defaults):
        out[r.id] = r.error.message if r.error else (r.token_ids, [lp.logprob for lp in r.logprobs or []])
    return out


def assert_same(got: dict, want: dict) -> None:
    """The same ids, greedy tokens equal, logprobs close (float32: a batch's makeup moves the last bits)."""
    assert got.keys() == want.keys()
    for rid, value in got.items():
        assert isinstance(value, tuple), (rid, value)
        assert value[0] == want[rid][0], rid
        assert value[1] == pytest.approx(want[rid][1], abs=1e-4), rid


def write_manifest(path: Path, adapters: dict) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps({"adapters": adapters}))
    else:
        import yaml

        path.write_text(yaml.safe_dump({"adapters": adapters}))
    return path


@pytest.fixture
def mixed_manifest(tmp_path, s3, llama_adapters):  # noqa: F811 - the fixture
    """attn4 local (relative path), mlp8 and all16rs on S3, pattern in a multi-adapter Hub repo (YAML)."""
    shutil.copytree(llama_adapters / "attn4", tmp_path / "local" / "attn4")
    bucket = s3.bucket("loras")
    s3.upload_folder(llama_adapters / "mlp8", bucket, "team/mlp8")
    s3.upload_folder(llama_adapters / "all16rs", bucket, "team/all16rs")
    fake_hub("org/tiny-loras", adapter_files(llama_adapters / "pattern", "pattern/"), revision="v1")
    return write_manifest(
        tmp_path / "adapters.yaml",
        {
            "attn4": "./local/attn4",
            "mlp8": "s3://loras/team/mlp8",
            "all16rs": {"source": "s3://loras/team", "subfolder": "all16rs"},
            "pattern": {"source": "org/tiny-loras@v1", "subfolder": "pattern"},
        },
    )


def test_a_manifest_mixing_local_s3_and_hub_serves_what_the_local_folder_serves(
    llama_dir,
    llama_adapters,
    mixed_manifest,
    s3,  # noqa: F811
):
    catalog = open_catalog(str(mixed_manifest))
    assert catalog.names() == sorted(ADAPTERS)
    assert catalog.describe("mlp8") == "s3://loras/team/mlp8"
    assert catalog.describe("pattern") == "hf://org/tiny-loras@v1/pattern"
    want = outputs(tiny_engine(llama_dir, llama_adapters), requests_for(ADAPTERS))
    engine = tiny_engine(llama_dir, mixed_manifest)
    got = outputs(engine, requests_for(ADAPTERS))
    assert_same(got, want)
    assert engine.store.stats.disk_loads == 4
    weights_gets = [p for m, p in s3.requests if m == "GET" and p.endswith(WEIGHTS)]
    assert len(weights_gets) == 2  # each S3 adapter's weights downloaded once


def test_one_source_failing_mid_download_fails_only_its_requests(llama_dir, llama_adapters, tmp_path, s3):  # noqa: F811
    bucket = s3.bucket("loras")
    for name in ADAPTERS:
        s3.upload_folder(llama_adapters / name, bucket, f"a/{name}")
    manifest = write_manifest(tmp_path / "m.json", {n: f"s3://loras/a/{n}" for n in ADAPTERS})
    # the listing and HEAD work; every GET of mlp8's weights fails: the download starts and breaks
    s3.fail_next(None, f"/loras/a/mlp8/{WEIGHTS}", status=503, method="GET")
    t0 = time.perf_counter()
    got = outputs(tiny_engine(llama_dir, manifest), requests_for(ADAPTERS))
    seconds = time.perf_counter() - t0
    want = outputs(tiny_engine(llama_dir, llama_adapters), requests_for(ADAPTERS))
    for rid, value in got.items():
        if rid.startswith("mlp8"):
            assert isinstance(value, str), value
            assert (
                "s3://loras/a/mlp8" in value and f"download failed after {remote_module.ATTEMPTS} attempts" in value
            ), value
        else:
            assert_same({rid: value}, {rid: want[rid]})
    failed_gets = [p for m, p in s3.requests if m == "GET" and p.endswith(f"mlp8/{WEIGHTS}")]
    assert remote_module.ATTEMPTS <= len(failed_gets) <= 3 * remote_module.ATTEMPTS  # bounded
    assert seconds < 120
    assert not list((tmp_path / "loracli-cache").rglob("*.part"))  # nothing half-written is left


def test_a_second_run_reads_everything_from_the_cache_with_the_network_off(
    llama_dir,
    llama_adapters,
    mixed_manifest,
    tmp_path,
    s3,  # noqa: F811
):
    first = outputs(tiny_engine(llama_dir, mixed_manifest), requests_for(ADAPTERS))
    s3.upload_folder(llama_adapters / "attn4", "loras", "folder/attn4")
    s3.upload_folder(llama_adapters / "mlp8", "loras", "folder/mlp8")
    folder_catalog = open_catalog("s3://loras/folder/")
    assert folder_catalog.names() == ["attn4", "mlp8"]
    folder_catalog.local_folder("mlp8")
    s3.stop()  # connection refused from here on; the Hub is offline (HF_HUB_OFFLINE)
    t0 = time.perf_counter()
    second = outputs(tiny_engine(llama_dir, mixed_manifest), requests_for(ADAPTERS))
    seconds = time.perf_counter() - t0
    assert_same(second, first)
    offline = open_catalog("s3://loras/folder/")  # the names from the cached listing
    assert offline.names() == ["attn4", "mlp8"]
    assert (offline.local_folder("mlp8") / WEIGHTS).read_bytes() == (llama_adapters / "mlp8" / WEIGHTS).read_bytes()
    with pytest.raises(AdapterError, match=r"s3://loras/folder/attn4: cannot list the folder .* nothing is cached"):
        offline.local_folder("attn4")  # never fetched: fails, naming the source
    print(f"cached offline run: {seconds:.2f} s")


def test_retries_then_success_and_one_download_for_concurrent_callers(llama_adapters, s3):  # noqa: F811
    s3.upload_folder(llama_adapters / "attn4", s3.bucket("loras"), "x/attn4")
    s3.fail_next(2, f"/loras/x/attn4/{WEIGHTS}", status=500, method="GET")  # two transient errors
    catalog = open_catalog("s3://loras/x")
    folders = []
    threads = [threading.Thread(target=lambda: folders.append(catalog.local_folder("attn4"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(folders)) == 1 and len(folders) == 4
    for name in ("adapter_config.json", WEIGHTS):
        assert (folders[0] / name).read_bytes() == (llama_adapters / "attn4" / name).read_bytes()
    gets = [p for m, p in s3.requests if m == "GET" and p.endswith(WEIGHTS)]
    assert len(gets) == 3  # 2 failed + 1 good: the other threads waited for the one download
    assert sorted(p.name for p in folders[0].iterdir()) == sorted(
        [".loracli-complete.json", "adapter_config.json", WEIGHTS]
    )


def test_manifest_scale_and_pinned_are_honoured(llama_dir, llama_adapters, tmp_path):
    manifest = write_manifest(
        tmp_path / "m.json",
        {
            "half": {"source": str(llama_adapters / "attn4"), "scale": 0.5, "pinned": True},
            "mlp8": str(llama_adapters / "mlp8"),
        },
    )
    engine = tiny_engine(llama_dir, manifest)
    assert engine.pins == ("half",) and "half" in engine.slots.pinned
    got = outputs(engine, requests_for(["half"]))
    mix = [
        parse_object({"id": f"half-{i}", "adapter": {"attn4": 0.5}, "prompt": r.prompt, "logprobs": 2}, 1, "f")
        for i, r in enumerate(requests_for(["half"]))
    ]
    want = outputs(tiny_engine(llama_dir, llama_adapters), mix)
    for rid, (tokens, logprobs) in got.items():
        assert tokens == want[rid][0]
        assert logprobs == pytest.approx(want[rid][1], abs=1e-4)
    too_many = write_manifest(
        tmp_path / "pins.json", {n: {"source": str(llama_adapters / n), "pinned": True} for n in ADAPTERS[:3]}
    )
    with pytest.raises(ConfigError, match="pin 3 adapters but min_loras is 2"):
        tiny_engine(llama_dir, too_many)


def test_a_scale_on_an_adapter_that_does_not_scale_linearly_is_refused(llama_dir, tmp_path):
    from tiny import make_adapter

    make_adapter(llama_dir, tmp_path / "head", r=4, targets=("q_proj",), modules_to_save=["lm_head"])
    manifest = write_manifest(tmp_path / "m.json", {"head": {"source": str(tmp_path / "head"), "scale": 2}})
    got = outputs(tiny_engine(llama_dir, manifest), requests_for(["head"]))
    assert all(
        isinstance(v, str) and "scale 2.0 is for plain LoRA adapters" in v and "vocab" in v for v in got.values()
    )


@pytest.mark.parametrize(
    "name",
    ["../attn4", "a/b", "a\\b", "..", ".", "a\x00b", "s3://b/x", "file:x", "my:lora", "hf::x", "", "x" * 256, "a\nb"],
)
def test_unsafe_adapter_names_are_refused_before_any_filesystem_call(name):
    assert name_problem(name)
    from loracli.errors import InputError

    for record in ({"adapter": name, "prompt": "p"}, {"adapter": {name: 1.0}, "prompt": "p"}):
        with pytest.raises(InputError, match="adapter"):
            parse_object(record, 1, "in.jsonl")
    openai = {"custom_id": "c", "url": "/v1/completions", "body": {"model": name, "prompt": "p"}}
    with pytest.raises(InputError, match="body.model"):
        parse_object(openai, 1, "in.jsonl", frozenset({"base"}))


@pytest.mark.parametrize("name", ["attn4", "my-lora_v2.1", "Org.Name", "a b", "ü-lora"])
def test_ordinary_names_pass(name):
    assert name_problem(name) is None


def test_a_request_reaches_only_catalog_names(llama_dir, llama_adapters, tmp_path):
    """A folder next to the adapters folder, and an absolute path, are unknown adapters: nothing is read."""
    shutil.copytree(llama_adapters / "attn4", tmp_path / "outside")
    engine = tiny_engine(llama_dir, llama_adapters)
    reqs = [
        parse_object({"id": "abs", "adapter": "attn4", "prompt": "p"}, 1, "f"),
        parse_object({"id": "out", "adapter": "outside", "prompt": "p"}, 2, "f"),
    ]
    got = outputs(engine, reqs)
    assert isinstance(got["abs"], tuple) and got["out"].startswith("unknown adapter 'outside'")
    assert not engine.store.has(str(tmp_path / "outside")) and not engine.store.has("../outside")


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAKEY:topsecret@bucket/adapters/",
        "https://host/adapters.json?token=topsecret",
        "gs://bucket/m.yaml?X-Goog-Signature=topsecret",
    ],
)
def test_urls_with_credentials_are_refused_without_showing_them(url):
    with pytest.raises(ConfigError) as info:
        EngineConfig(adapters_dir=url)
    assert "credential" in str(info.value) and "topsecret" not in str(info.value) and "AKIAKEY" not in str(info.value)
    assert info.value.fields == ("adapters_dir",)


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({"..": "./a"}, "must not hold '..'"),
        ({"a": "s3://k:topsecret@b/a"}, "credentials"),
        ({"a": "http://h/a?signature=topsecret"}, "credential query parameter"),
        ({"a": {"source": "./a", "shape": 1}}, "a.shape: unknown key"),
        ({"a": {"source": "./a", "scale": "big"}}, "a.scale: must be a finite number"),
        ({"a": {"source": "./a", "pinned": "yes"}}, "a.pinned: must be true or false"),
        ({"a": {"source": "./a", "revision": "v2"}}, "only a Hub source has a revision"),
        ({"a": "adapters"}, "is not a local path"),
        ({"a": {"source": "org/name", "subfolder": "../up"}}, "a.subfolder: must be a non-empty string without '..'"),
        ({"a": 3}, "a source string or an object"),
    ],
)
def test_bad_manifests_are_refused_naming_the_entry(tmp_path, entry, problem):
    manifest = write_manifest(tmp_path / "m.json", entry)
    with pytest.raises(ConfigError, match=re_escape(problem)) as info:
        open_catalog(str(manifest))
    message = str(info.value)
    assert str(manifest) in message and "topsecret" not in message and "\n" not in message


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_a_folder_with_an_unsafe_subfolder_name_is_refused(tmp_path, llama_adapters):
    shutil.copytree(llama_adapters / "attn4", tmp_path / "ads" / "v1..2")
    with pytest.raises(ConfigError, match=r"adapter 'v1\.\.2' is refused .*rename it"):
        open_catalog(str(tmp_path / "ads"))


def test_pickle_weights_on_s3_stay_refused_unless_allowed(llama_dir, tmp_path, s3):  # noqa: F811
    import torch
    from safetensors.torch import load_file
    from tiny import make_adapter

    from loracli.adapter_store import AdapterStore
    from loracli.model.loader import load_config

    folder = make_adapter(llama_dir, tmp_path / "pk", r=4, targets=("q_proj",))
    torch.save(load_file(str(folder / WEIGHTS)), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    s3.upload_folder(folder, s3.bucket("loras"), "p/pk")
    spec = load_config(llama_dir)[1]
    refused = AdapterStore("s3://loras/p", spec, max_cpu_loras=2, max_lora_rank=16)
    with pytest.raises(AdapterError, match="pickle weights are refused"):
        refused.get("pk")
    allowed = AdapterStore("s3://loras/p", spec, max_cpu_loras=2, max_lora_rank=16, allow_pickle=True)
    assert allowed.get("pk").max_rank == 4


MISSING_EXTRA = """
import sys
sys.modules[{module!r}] = None  # as if the extra were not installed
from loracli.adapter_sources import open_catalog
try:
    open_catalog({where!r})
except Exception as e:
    print(type(e).__name__, e)
"""


@pytest.mark.parametrize(
    "module, where, extra",
    [("s3fs", "s3://bucket/adapters/", "s3"), ("huggingface_hub", "MANIFEST", "hub")],
)
def test_a_missing_extra_is_one_line_naming_it(tmp_path, module, where, extra):
    if where == "MANIFEST":
        where = str(write_manifest(tmp_path / "m.json", {"a": "org/name@v1"}))
    code = MISSING_EXTRA.format(module=module, where=where)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith("ConfigError adapters_dir") and f"pip install 'loracli[{extra}]'" in out, out
    assert "\n" not in out


def test_a_hub_repo_of_adapters_and_a_manifest_on_s3(llama_adapters, tmp_path, s3):  # noqa: F811
    files = {**adapter_files(llama_adapters / "attn4", "attn4/"), **adapter_files(llama_adapters / "mlp8", "mlp8/")}
    fake_hub("org/many", {**files, "README.md": llama_adapters / "attn4" / "adapter_config.json"}, revision="v3")
    hub = open_catalog("hf://org/many@v3")
    assert hub.names() == ["attn4", "mlp8"] and hub.describe("mlp8") == "hf://org/many@v3/mlp8"
    assert (hub.local_folder("mlp8") / WEIGHTS).read_bytes() == (llama_adapters / "mlp8" / WEIGHTS).read_bytes()
    with pytest.raises(ConfigError, match="hf://org/missing"):
        open_catalog("hf://org/missing")  # not cached and offline: refused at start, naming the source

    s3.upload_folder(llama_adapters / "attn4", s3.bucket("loras"), "m/attn4")
    s3.put(
        "loras",
        "m/adapters.json",
        json.dumps({"adapters": {"x": "s3://loras/m/attn4", "y": "org/many@v3/mlp8"}}).encode(),
    )
    catalog = open_catalog("s3://loras/m/adapters.json")
    assert catalog.names() == ["x", "y"] and catalog.describe("y") == "hf://org/many@v3/mlp8"
    assert (catalog.local_folder("x") / WEIGHTS).read_bytes() == (llama_adapters / "attn4" / WEIGHTS).read_bytes()
    s3.put("loras", "m/relative.json", json.dumps({"adapters": {"x": "./attn4"}}).encode())
    with pytest.raises(ConfigError, match="relative path in a manifest on a URL"):
        open_catalog("s3://loras/m/relative.json")


@pytest.mark.parametrize("botocore_checks", ["when_supported", "when_required"])
def test_a_corrupted_download_is_caught_by_its_checksum(llama_adapters, s3, monkeypatch, botocore_checks):  # noqa: F811
    """With botocore's own response check off ("when_required"), loracli's MD5-against-ETag check catches it."""
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", botocore_checks)
    s3.upload_folder(llama_adapters / "attn4", s3.bucket("loras"), "c/attn4")
    s3.upload_folder(llama_adapters / "mlp8", "loras", "c/mlp8")
    s3.corrupt_next(1, f"/loras/c/attn4/{WEIGHTS}")  # once: the retry gets the right bytes
    s3.corrupt_next(None, f"/loras/c/mlp8/{WEIGHTS}")  # always
    catalog = open_catalog("s3://loras/c")
    good = catalog.local_folder("attn4")
    assert (good / WEIGHTS).read_bytes() == (llama_adapters / "attn4" / WEIGHTS).read_bytes()
    why = "MD5 differs from the ETag" if botocore_checks == "when_required" else "FlexibleChecksumError"
    with pytest.raises(AdapterError, match=rf"s3://loras/c/mlp8: download failed after 4 attempts \(.*{why}"):
        catalog.local_folder("mlp8")


def test_ray_shipping_takes_a_local_folder_only(llama_dir, llama_adapters, tmp_path):
    from loracli.cluster.options import ClusterOptions
    from loracli.cluster.pool import RayPool

    manifest = write_manifest(tmp_path / "m.json", {"a": str(llama_adapters / "attn4")})
    config = EngineConfig(model=str(llama_dir), adapters_dir=str(manifest), device="cpu")
    with pytest.raises(ConfigError, match="ship_adapters sends a local folder's adapters") as info:
        RayPool(config, ClusterOptions(workers=1, ship_adapters=True))  # refused before Ray starts
    assert set(info.value.fields) == {"adapters_dir", "ship_adapters"}
