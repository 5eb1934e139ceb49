"""Read an offline wandb run file (run-<id>.wandb) without a server: wandb 0.31 ships no Python reader, so this
follows the file's documented layout: a 7-byte header (':W&B', 0xBEE1, version 0), then LevelDB-log records (32 KiB
blocks; each record a 7-byte header crc32/length/type: 1 full, 2 first, 3 middle, 4 last) holding wandb's own
protobuf Record messages (wandb.proto.wandb_internal_pb2)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:7] == HEADER, f"{path}: not a wandb run file (header {data[:7]!r})"
    out, buf, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if kind == 0 and length == 0:
            break
        assert len(chunk) == length, f"{path}: truncated record at byte {pos}"
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
    recs = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        recs.append(r)
    return recs


def run_files(root: Path, run_id: str | None = None) -> list[Path]:
    """Every offline run file under root (one per segment of a resumed run), oldest first."""
    files = sorted(Path(root).rglob("run-*.wandb"), key=lambda p: p.parent.name)
    return [f for f in files if run_id is None or f.name == f"run-{run_id}.wandb"]


def summarize(path: Path) -> dict:
    """run (id, project, group, name, job_type, config), history rows {step: {key: value}}, summary, exit code."""
    info = {"history": {}, "summary": {}, "exit_code": None, "config": {}}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
            info.update(id=run.run_id, project=run.project, group=run.run_group, name=run.display_name,
                        job_type=run.job_type, tags=list(run.tags))
            info["config"].update({i.key: json.loads(i.value_json) for i in run.config.update})
        elif kind == "config":
            info["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            info["history"][int(row.pop("_step", r.history.step.num))] = row
        elif kind == "summary":
            info["summary"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                    for i in r.summary.update})
        elif kind == "exit":
            info["exit_code"] = r.exit.exit_code
    return info
