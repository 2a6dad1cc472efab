"""``produce extract``: input files → one intermediate EventIndex file (``.ei``)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from eventindex.errors import ValidationError
from producers.eifile import EventIndexFileWriter, FileHeader
from producers.readers import DEFAULT_TREE, InputFormat, read_events


@dataclass(frozen=True)
class ExtractOptions:
    """What the job knows about its output: dataset, GUID, ids; and how to read inputs."""

    dataset: str = ""
    collection: str = ""
    guid: str = ""
    task_id: str = "0"
    job_id: str = "0"
    producer: str = ""
    input_format: InputFormat | None = None
    tree: str = DEFAULT_TREE
    root_format: str = ""
    root_guid: str = ""


def collection_of(dataset: str) -> str:
    """The collection of an ATLAS dataset name: ``project.stream``.

    ``data15_13TeV.00284484.physics_Main.merge.AOD.r7562_p2521`` →
    ``data15_13TeV.physics_Main``.
    """
    parts = dataset.split(".")
    if len(parts) < 4 or not parts[1].isdigit() or not all(parts[:3]):
        raise ValidationError(
            f"cannot tell the collection of dataset {dataset!r}: not an ATLAS name "
            "(project.run.stream.step.format[.tag]); give --collection"
        )
    return f"{parts[0]}.{parts[2]}"


def _dataset_of(inputs: Sequence[Path]) -> str:
    """A dataset named by the input file (``generate --jsonl`` names files so)."""
    stems = {path.name.split(".jsonl")[0].removesuffix(path.suffix) for path in inputs}
    if len(stems) == 1:
        stem = stems.pop()
        try:
            collection_of(stem)
        except ValidationError:
            pass
        else:
            return stem
    raise ValidationError("give --dataset: the input file names do not name one dataset")


def extract(
    inputs: Sequence[Path],
    output: Path,
    options: ExtractOptions,
    *,
    message_bytes: int,
    overwrite: bool = False,
    progress: Callable[[Path, int], None] | None = None,
) -> FileHeader:
    """Read every input and write ``output``; returns the header written.

    An existing output is refused unless ``overwrite``: it may hold a send log.
    ``progress`` is called with each input read and its event count.
    """
    if not inputs:
        raise ValidationError("no input files")
    if output.exists() and not overwrite:
        raise ValidationError(f"{output} exists (it may hold a send log); use --force to replace")
    dataset = options.dataset or _dataset_of(inputs)
    header = FileHeader(
        producer=options.producer or socket.getfqdn() or "producer",
        collection=options.collection or collection_of(dataset),
        dataset=dataset,
        guid=(options.guid or str(uuid.uuid4())).upper(),
        task_id=options.task_id,
        job_id=options.job_id,
        sources=tuple(str(path) for path in inputs),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    with EventIndexFileWriter(output, header, message_bytes=message_bytes) as writer:
        for path in inputs:
            table = read_events(
                path,
                options.input_format,
                tree=options.tree,
                root_format=options.root_format,
                root_guid=options.root_guid,
            )
            writer.write(table)
            if progress is not None:
                progress(path, table.num_rows)
    assert writer.written is not None  # set by the with block's close
    return writer.written


__all__ = ["ExtractOptions", "collection_of", "extract"]
