"""Batch reads of cached array columns straight from arrow, for the training DataLoader.

datasets' numpy formatter costs ~0.2 ms per array column and call on the tiny run (it rebuilds the
extension type of every row chunk from its JSON metadata), and a step reads two to four such columns
(latents, prompt embeddings, focus maps, reference latents): the largest piece of a cached step outside
the denoiser. :class:`ArrayRows` takes a batch's rows from the dataset's arrow table with the array
columns as plain lists, their float16 values as numpy views and the other columns as Python values;
every other access is the dataset's own.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


def row_arrays(column: pa.ChunkedArray, inner_shape: tuple[int, ...]) -> list[np.ndarray] | None:
    """The rows of a list-per-row array column as numpy views ``(n_i, *inner_shape)`` (n_i: the row's first axis,
    which may vary); None if a row is null (the caller then reads the column the slow way)."""
    storage = column.combine_chunks()
    if storage.null_count:
        return None
    lengths = storage.value_lengths().to_numpy()
    values = storage.flatten()
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = values.flatten()  # arrow slices keep their offsets: flatten reads only these rows
    leaves = values.to_numpy(zero_copy_only=False).reshape(int(lengths.sum()), *inner_shape)
    return np.split(leaves, np.cumsum(lengths)[:-1])


def without_extension_types(table: pa.Table) -> pa.Table:
    """``table`` with datasets' array extension columns as their plain list storage (the same buffers): taking rows
    of it then never rebuilds an extension type."""
    for i, field in enumerate(table.schema):
        if isinstance(field.type, pa.ExtensionType):
            storage = pa.chunked_array([chunk.storage for chunk in table.column(i).chunks], field.type.storage_type)
            table = table.set_column(i, field.name, storage)
    return table


def placeholders(column: pa.ChunkedArray) -> list:
    """A column no step reads, as what its rows' counts need: ``[None] * n`` for a list of n values, None for a
    null row or a value that is not a list (the bytes of an image are never copied out of arrow)."""
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return [None] * len(column)
    return [None if n is None else [None] * n for n in column.combine_chunks().value_lengths().to_pylist()]


class ArrayRows(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` whose batch reads (``__getitems__``, what the DataLoader calls) return its
    ``array_columns`` as numpy arrays read from arrow directly and its ``unread_columns`` as
    :func:`placeholders`; indexing, iteration and every attribute are the wrapped dataset's (``dataset``,
    numpy-formatted for the array columns)."""

    def __init__(self, dataset, array_columns: list[str], unread_columns: tuple[str, ...] = ()):
        self.dataset, self.array_columns, self.unread_columns = dataset, array_columns, tuple(unread_columns)
        self.table = without_extension_types(dataset.with_format("arrow")[:])  # zero-copy: memory-mapped views
        self.inner_shapes = {name: tuple(getattr(dataset.features[name], "shape", (None,))[1:])
                             for name in array_columns}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # one-row slices (zero-copy), not Table.take: take concatenates every chunk of a column, all of it, per call
        table = pa.concat_tables([self.table.slice(i, 1) for i in indices])
        rows = table.drop_columns([*self.array_columns, *self.unread_columns]).to_pylist()
        for name in self.unread_columns:
            for row, value in zip(rows, placeholders(table[name])):
                row[name] = value
        for name in self.array_columns:
            values = row_arrays(table[name], self.inner_shapes[name])
            if values is None:
                values = self.dataset.select_columns([name])[indices][name]
            for row, value in zip(rows, values):
                row[name] = value
        return rows

    def __getstate__(self) -> dict:  # DataLoader workers under "spawn": the table would pickle the whole cache
        return {"dataset": self.dataset, "array_columns": self.array_columns, "unread_columns": self.unread_columns}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["dataset"], state["array_columns"], state["unread_columns"])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset[key]

    def __iter__(self):
        return iter(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
