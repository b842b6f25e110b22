"""tools/fetch.py and utils/fetch.py against a loopback HTTP server (no test leaves the machine),
and the real table's entries checked against the configs that read them."""
from __future__ import annotations

import hashlib
import io
import re
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config import load_config
from irn.misc.settings import load_settings
from tests.conftest import REPO
from tools import fetch as cli
from utils.downloads import DOWNLOADS, GROUPS
from utils.fetch import (HASH_KINDS, DownloadError, Entry, HashMismatchError, Read, UnreachableError,
                         UnverifiedError)

BODY = bytes(range(256)) * 40          # 10,240 bytes
SHA = hashlib.sha256(BODY).hexdigest()
MD5 = hashlib.md5(BODY).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """GET with Range support (206 / 416), a cut-off after N bytes and a Range-blind mode."""

    def do_GET(self):  # noqa: N802 - http.server's name
        state = self.server.state
        rng = self.headers.get("Range")
        state["requests"].append((self.path, rng))
        body = state["files"].get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if rng and self.path not in state["ignore_range"]:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if self.path in state["wrong_range"]:   # answers 206 but from another offset
                start = 0
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        data = body[start:]
        cut = state["cut"].pop(self.path, None)
        if cut is not None:     # send N bytes, then drop the connection
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = {"files": {}, "requests": [], "cut": {}, "ignore_range": set(), "wrong_range": set()}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, httpd.state
    httpd.shutdown()
    httpd.server_close()


def _weights(url: str, hash_: str | None, target: str = "data/model_zoo/w.pth") -> Entry:
    return Entry(kind="weights", url=url, hash=hash_, size=None, target=target,
                 reads=(Read("configs/model/deeplabv3plus.yaml", "model.backbone.pretrained", target),))


def _fetch(tmp_path, table, names, kind="weights", **kw):
    logs: list[str] = []
    lines = cli.fetch(kind, names, root=tmp_path, table=table, groups={}, progress=False, log=logs.append, **kw)
    return lines, logs


def test_good_download_installs_and_names_the_config_key(server, tmp_path):
    base, state = server
    state["files"]["/w.pth"] = BODY
    lines, logs = _fetch(tmp_path, {"w": _weights(f"{base}/w.pth", f"sha256:{SHA}")}, ["w"])
    target = tmp_path / "data/model_zoo/w.pth"
    assert target.read_bytes() == BODY
    assert not target.with_name("w.pth.part").exists()
    assert any(f"verified sha256 {SHA}" in m for m in logs)
    assert lines == [f"w: {target}; set model.backbone.pretrained=data/model_zoo/w.pth "
                     f"(configs/model/deeplabv3plus.yaml has data/model_zoo/resnetv1d101_mmcv.pth)"]


def test_cut_download_resumes_with_range(server, tmp_path):
    base, state = server
    state["files"]["/w.pth"] = BODY
    state["cut"]["/w.pth"] = 3000
    table = {"w": _weights(f"{base}/w.pth", f"sha256:{SHA}")}
    with pytest.raises(DownloadError, match=r"broke off after 3000 .*rerun to resume"):
        _fetch(tmp_path, table, ["w"])
    part = tmp_path / "data/model_zoo/w.pth.part"
    assert part.read_bytes() == BODY[:3000]
    _fetch(tmp_path, table, ["w"])
    assert state["requests"][-1] == ("/w.pth", "bytes=3000-")
    assert (tmp_path / "data/model_zoo/w.pth").read_bytes() == BODY
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    base, state = server
    state["files"]["/w.pth"] = BODY
    state["ignore_range"].add("/w.pth")
    part = tmp_path / "data/model_zoo/w.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 500)                      # a stale part the server will not continue
    _fetch(tmp_path, {"w": _weights(f"{base}/w.pth", f"sha256:{SHA}")}, ["w"])
    assert state["requests"] == [("/w.pth", "bytes=500-")]
    assert (tmp_path / "data/model_zoo/w.pth").read_bytes() == BODY


def test_a_206_from_another_offset_restarts_without_range(server, tmp_path):
    base, state = server
    state["files"]["/w.pth"] = BODY
    state["wrong_range"].add("/w.pth")
    part = tmp_path / "data/model_zoo/w.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BODY[:700])
    _fetch(tmp_path, {"w": _weights(f"{base}/w.pth", f"sha256:{SHA}")}, ["w"])
    assert state["requests"] == [("/w.pth", "bytes=700-"), ("/w.pth", None)]
    assert (tmp_path / "data/model_zoo/w.pth").read_bytes() == BODY


def test_hash_mismatch_keeps_nothing_and_names_both(server, tmp_path):
    base, state = server
    state["files"]["/w.pth"] = BODY[:-1] + b"!"
    found = hashlib.sha256(BODY[:-1] + b"!").hexdigest()
    with pytest.raises(HashMismatchError) as e:
        _fetch(tmp_path, {"w": _weights(f"{base}/w.pth", f"sha256:{SHA}")}, ["w"])
    assert f"expected {SHA}, found {found}" in str(e.value) and "nothing installed" in str(e.value)
    assert list((tmp_path / "data/model_zoo").iterdir()) == []


def test_md5_entry(server, tmp_path):
    base, state = server
    state["files"]["/v.tar"] = BODY
    _, logs = _fetch(tmp_path, {"v": _weights(f"{base}/v.tar", f"md5:{MD5}")}, ["v"])
    assert (tmp_path / "data/model_zoo/w.pth").read_bytes() == BODY
    assert any(f"verified md5 {MD5}" in m for m in logs)


def test_hash_prefix_entry_checks_the_name_prefix(server, tmp_path):
    base, state = server
    state["files"][f"/w-{SHA[:8]}.pth"] = BODY
    _fetch(tmp_path, {"w": _weights(f"{base}/w-{SHA[:8]}.pth", f"sha256-prefix:{SHA[:8]}")}, ["w"])
    assert (tmp_path / "data/model_zoo/w.pth").read_bytes() == BODY
    state["files"]["/bad-00000000.pth"] = BODY
    with pytest.raises(HashMismatchError, match=f"sha256-prefix: expected 00000000, found {SHA[:8]}"):
        _fetch(tmp_path, {"b": _weights(f"{base}/bad-00000000.pth", "sha256-prefix:00000000",
                                        "data/model_zoo/b.pth")}, ["b"])


def test_404_names_url_and_manual_route(server, tmp_path):
    base, _ = server
    with pytest.raises(UnreachableError) as e:
        _fetch(tmp_path, {"w": _weights(f"{base}/gone.pth", f"sha256:{SHA}")}, ["w"])
    text = str(e.value)
    assert f"{base}/gone.pth: HTTP 404" in text and "\n" not in text
    assert f"put it at {tmp_path / 'data/model_zoo/w.pth'}" in text and "tools/fetch.py weights w" in text


def test_refused_connection_names_url_and_manual_route(tmp_path):
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.pth"
    with pytest.raises(UnreachableError) as e:
        _fetch(tmp_path, {"w": _weights(url, f"sha256:{SHA}")}, ["w"])
    text = str(e.value)
    assert text.startswith(f"cannot reach {url} (") and "\n" not in text
    assert f"manual route: download {url} yourself, put it at {tmp_path / 'data/model_zoo/w.pth'}" in text


def test_present_and_verified_is_skipped_and_a_wrong_file_is_kept(server, tmp_path):
    base, state = server
    state["files"]["/w.pth"] = BODY
    table = {"w": _weights(f"{base}/w.pth", f"sha256:{SHA}")}
    _fetch(tmp_path, table, ["w"])
    _, logs = _fetch(tmp_path, table, ["w"])
    assert len(state["requests"]) == 1
    assert f"present, verified, sha256 {SHA}; skipped" in logs[0]
    target = tmp_path / "data/model_zoo/w.pth"
    target.write_bytes(b"someone else's file")
    with pytest.raises(HashMismatchError, match="is present but is not w .*move it away"):
        _fetch(tmp_path, table, ["w"])
    assert target.read_bytes() == b"someone else's file"


def test_unverified_entry_refused_without_the_flag(server, tmp_path):
    base, state = server
    state["files"]["/m.bin"] = BODY
    table = {"m": _weights(f"{base}/m.bin", None)}
    with pytest.raises(UnverifiedError) as e:
        _fetch(tmp_path, table, ["m"])
    assert f"no published hash; sha256 {SHA}" in str(e.value) and "--accept-unverified" in str(e.value)
    assert not (tmp_path / "data/model_zoo/w.pth").exists()
    _, logs = _fetch(tmp_path, table, ["m"], accept_unverified=True)   # the kept part is complete
    assert state["requests"][-1] == ("/m.bin", f"bytes={len(BODY)}-")
    assert (tmp_path / "data/model_zoo/w.pth").read_bytes() == BODY
    assert any("installed unverified" in m for m in logs)


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_data_archive_unpacks_and_chains_the_prepare_step(server, tmp_path):
    base, state = server
    archive = _tar({"pkg/Thing/a.txt": b"a", "pkg/Thing/sub/b.txt": b"b", "pkg/README": b"r"})
    state["files"]["/pkg.tgz"] = archive
    entry = Entry(kind="data", url=f"{base}/pkg.tgz", hash=f"sha256:{hashlib.sha256(archive).hexdigest()}",
                  size=len(archive), target="data/downloads/pkg.tgz", unpack=("pkg/Thing", "data/Thing"),
                  prepare="stub", reads=(Read("configs/data/voc.yaml", "data.root", "data"),))
    calls = []

    def stub(root, table, progress):
        calls.append(sorted(p.name for p in (root / "data/Thing").rglob("*")))
        return "stub: prepared"

    lines, logs = _fetch(tmp_path, {"thing": entry}, ["thing"], kind="data", steps={"stub": stub})
    assert (tmp_path / "data/Thing/a.txt").read_bytes() == b"a"
    assert (tmp_path / "data/Thing/sub/b.txt").read_bytes() == b"b"
    assert not (tmp_path / "data/README").exists() and not list(tmp_path.glob("data/.*unpack"))
    assert calls == [["a.txt", "b.txt", "sub"]] and "stub: prepared" in logs
    assert lines == [f"thing: {tmp_path / 'data/Thing'}; data.root (configs/data/voc.yaml) reads it by default"]
    _, logs = _fetch(tmp_path, {"thing": entry}, ["thing"], kind="data", steps={"stub": stub},
                     delete_archives=True)
    assert len(state["requests"]) == 1 and "already unpacked; skipped" in logs[0]


def test_cli_unknown_name_and_list(capsys):
    assert cli.main(["weights", "resnet-9000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown weights entry 'resnet-9000'; known: ") and err.count("\n") == 1
    assert cli.main(["data", "resnet50-v1"]) == 2
    assert "is a weights entry: python tools/fetch.py weights resnet50-v1" in capsys.readouterr().err
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name, e in DOWNLOADS.items():
        assert re.search(rf"^{re.escape(name)}\s+{e.kind}\s", out, re.M)


# ----------------------------------------------------------------------------- the real table

RUN_CONFIGS = {"deeplabv3plus": "configs/beco_voc.yaml", "deeplabv2": "configs/beco_voc_deeplabv2.yaml",
               "segformer": "configs/beco_voc_segformer_b2.yaml", "voc": "configs/beco_voc.yaml",
               "coco": "configs/beco_coco.yaml"}


def _loaded(read: Read, override: bool):
    """The key's value as the project's own loaders give it (with ``key=value`` when asked)."""
    extra = [f"{read.key}={read.value}"] if override else []
    if Path(read.config).parent.name == "first_stage":
        return getattr(load_settings(REPO / read.config, extra), read.key)
    value = load_config(REPO / RUN_CONFIGS[Path(read.config).stem], extra)
    for part in read.key.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", sorted(DOWNLOADS))
def test_real_entry_is_well_formed(name):
    e = DOWNLOADS[name]
    assert e.kind in ("weights", "data") and e.url.startswith("https://")
    assert e.target.startswith("data/") and ".." not in Path(e.target).parts
    if e.hash is not None:
        kind, hexdigits = e.hash.split(":")
        assert kind in HASH_KINDS and re.fullmatch(f"[0-9a-f]{{{HASH_KINDS[kind]}}}", hexdigits)
        if kind == "sha256-prefix":     # the prefix is the one in the published file name
            assert re.search(rf"-{hexdigits}\.pth$", e.url)
    assert e.size is None or e.size > 0
    if e.unpack:
        assert e.unpack[1].startswith("data/") and e.prepare in cli.PREPARE_STEPS
    assert e.reads
    for read in e.reads:
        assert (REPO / read.config).is_file()
        assert _loaded(read, override=False) == cli.config_default(read.config, read.key)
        assert _loaded(read, override=True) == read.value


def test_groups_name_real_entries():
    assert all(m in DOWNLOADS for members in GROUPS.values() for m in members)


def _tar_tree(folder: Path, arcname: str, skip: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(folder, arcname, filter=lambda m: None if any(s in m.name for s in skip) else m)
    return buf.getvalue()


def test_voc2012_and_sbd_end_ready_for_training(server, tmp_path, synthetic_set):
    """`fetch.py data voc2012 sbd` with the real entries' layout and preparation step: a VOC tar
    and an SBD tgz served locally end as data/VOC2012 with SegmentationClassAug and train_aug."""
    from dataclasses import replace

    from scipy.io import savemat
    base, state = server
    voc = synthetic_set("voc", train=4, val=2, test=3, size=(48, 64), classes=3, seed=3) / "VOC2012"
    voc_tar = _tar_tree(voc, "VOCdevkit/VOC2012", skip=("SegmentationClassAug", "train_aug.txt", "cls_labels"))
    test_ids = (voc / "ImageSets/Segmentation/test.txt").read_text().split()
    sbd = tmp_path / "src/dataset"
    (sbd / "cls").mkdir(parents=True)
    for i in test_ids:
        savemat(str(sbd / "cls" / f"{i}.mat"), {"GTcls": {"Segmentation": np.full((48, 64), 2, np.uint8)}})
    (sbd / "train.txt").write_text("\n".join(test_ids[:2]) + "\n")
    (sbd / "val.txt").write_text(test_ids[2] + "\n")
    sbd_tgz = _tar_tree(sbd, "benchmark_RELEASE/dataset")
    state["files"].update({"/voc.tar": voc_tar, "/benchmark.tgz": sbd_tgz})
    table = {"voc2012": replace(DOWNLOADS["voc2012"], url=f"{base}/voc.tar", size=len(voc_tar),
                                hash=f"md5:{hashlib.md5(voc_tar).hexdigest()}"),
             "sbd": replace(DOWNLOADS["sbd"], url=f"{base}/benchmark.tgz", size=len(sbd_tgz),
                            hash=f"md5:{hashlib.md5(sbd_tgz).hexdigest()}")}

    lines, logs = _fetch(tmp_path, table, ["voc2012", "sbd"], kind="data")
    out = tmp_path / "data/VOC2012"
    aug = (out / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    train = (out / "ImageSets/Segmentation/train.txt").read_text().split()
    assert aug == sorted(set(train) | set(test_ids))
    assert sorted(p.stem for p in (out / "SegmentationClassAug").glob("*.png")) == sorted(
        set(aug) | {p.stem for p in (out / "SegmentationClass").glob("*.png")})
    assert np.all(np.asarray(Image.open(out / "SegmentationClassAug" / f"{test_ids[0]}.png")) == 2)
    assert (out / "cls_labels.json").is_file() and not (tmp_path / "data/VOCdevkit").exists()
    assert lines[0] == (f"voc2012: {out}; data.root (configs/data/voc.yaml) reads it by default; "
                        f"set voc12_root=data/VOC2012 (configs/first_stage/voc.yaml has ./VOCdevkit/VOC2012)")
    assert lines[1] == f"sbd: {tmp_path / 'data/benchmark_RELEASE'}; data.aug (configs/data/voc.yaml) reads it by default"
    # a rerun downloads nothing and skips the finished preparation
    _, logs = _fetch(tmp_path, table, ["voc2012", "sbd"], kind="data")
    assert len(state["requests"]) == 2
    assert any("voc_aug:" in m and "already prepared" in m for m in logs)


def _zip_tree(folder: Path, arcname: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, f"{arcname}/{p.relative_to(folder).as_posix()}")
    return buf.getvalue()


def test_coco2014_group_unpacks_zips_and_prepares(server, tmp_path, synthetic_set):
    """`fetch.py data coco2014`: the three zips of the real entries' layout, then prepare_coco."""
    from dataclasses import replace
    base, state = server
    coco = synthetic_set("coco", train=3, val=3, size=(48, 64), classes=3, seed=1)
    table = dict(DOWNLOADS)
    for name, folder in (("coco2014-train", "train2014"), ("coco2014-val", "val2014"),
                         ("coco2014-annotations", "annotations")):
        blob = _zip_tree(coco / folder, folder)
        state["files"][f"/{folder}.zip"] = blob
        table[name] = replace(DOWNLOADS[name], url=f"{base}/{folder}.zip", size=len(blob),
                              hash=f"sha256:{hashlib.sha256(blob).hexdigest()}")
    logs: list[str] = []
    cli.fetch("data", ["coco2014"], root=tmp_path, table=table, progress=False, log=logs.append)
    out = tmp_path / "data/coco"
    assert len(list((out / "mask/train2014").glob("*.png"))) == 3
    assert len(list((out / "mask/val2014").glob("*.png"))) == 3
    assert (out / "lists/val2014.txt").is_file() and (out / "cls_labels_train2014.json").is_file()
    assert any(m.startswith("coco: prepared") for m in logs)


def test_cli_refuses_a_present_file_that_is_not_the_published_one(tmp_path, capsys):
    """Through main() with the real table and no network: the file in place is checked first."""
    target = tmp_path / DOWNLOADS["resnet50-v1"].target
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not resnet")
    found = hashlib.sha256(b"not resnet").hexdigest()[:8]
    assert cli.main(["weights", "resnet50-v1", "--root", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {target} is present but is not resnet50-v1 (sha256-prefix: expected 0676ba61, "
                   f"found {found}); move it away and rerun to fetch it again\n")
    assert target.read_bytes() == b"not resnet"
