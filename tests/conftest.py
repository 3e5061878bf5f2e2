"""Shared fixtures: seeded, single-threaded, small."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def small_sine_zoo():
    """A small pre-trained sine zoo (each net from its own init), shared across tests."""
    from fedfuse.tasks import sine
    from fedfuse.zoo import ModelZoo

    torch.manual_seed(0)
    tasks = sine.sample_tasks(30, seed=0)
    weights = sine.pretrain(tasks, seed=1, points=100, steps=300)
    return tasks, ModelZoo(sine.SPEC, weights, tasks.tau, [f"c{i}" for i in range(30)])


class FlowerMessages:
    """Hypothesis strategies for whole Flower ``RecordDict``s as any sender could make them:
    records of any name and kind, ConfigRecords and MetricRecords with any key and any value
    Flower lets through, and ArrayRecords whose arrays are real numpy arrays of any dtype and
    shape or ``Array(dtype=..., shape=..., stype=..., data=...)`` with a lying npy header or no
    npy at all. ``contents(valid)`` starts from valid messages and breaks them a little, so that
    every branch of a parser is reached, not only its first refusal."""

    def __init__(self) -> None:
        import io
        import json
        import math

        import numpy as np
        from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
        from hypothesis import strategies as st

        self.st = st
        small_ints = st.one_of(st.integers(-4, 0), st.integers(-4, 400))
        archs = st.one_of(  # architecture JSON as a device could describe it
            st.fixed_dictionaries({"kind": st.just("mlp"), "sizes": st.lists(small_ints, max_size=4)},
                                  optional={"activation": st.sampled_from(["relu", "tanh", "swish"])}),
            st.fixed_dictionaries({"kind": st.just("vector"), "length": small_ints}),
            st.fixed_dictionaries({"kind": st.just("module"), "name": st.sampled_from(["small-cnn", "x"]),
                                   "config": st.dictionaries(st.sampled_from(["hidden", "channels", "kernel", "side",
                                                                              "classes", "bogus"]),
                                                             st.one_of(small_ints, st.lists(small_ints, max_size=3)),
                                                             max_size=3)}),
        ).map(json.dumps)
        texts = st.one_of(st.text(max_size=12), st.sampled_from(["a\nb", "x\r\nINFO forged", "\x1b[31m", "é" * 5]))
        ints = st.one_of(st.integers(-3, 300), st.integers(), st.sampled_from([2**63, -(2**63) - 1, 10**40, 10**400]))
        floats = st.one_of(st.floats(), st.sampled_from([1e300, -1e300, 1e39, 3.5e38, 1e-320]))
        scalars = [ints, floats, texts, st.binary(max_size=16), st.booleans()]
        self.config_values = st.one_of(*scalars, *(st.lists(s, max_size=5) for s in scalars))
        self.metric_values = st.one_of(ints, floats, st.lists(ints, max_size=5), st.lists(floats, max_size=5))
        keys = st.one_of(st.sampled_from(["client-id", "arch", "tau", "n-examples", "status", "reason", "flat",
                                          "uncertainty", "novelty", "shots", "score-0shot", "readout-factor",
                                          "readout-diag"]), st.text(max_size=8))
        self.keys = keys
        numbers = st.one_of(ints, floats)
        self._fields = {  # values that get past a parser's type checks to its later ones
            "arch": st.one_of(archs, st.sampled_from([2, 1200, 2040]).map(lambda d: "[" * d + "]" * d)),
            "tau": st.one_of(st.lists(ints, max_size=3), st.lists(floats, max_size=3)),
            "client-id": texts, "n-examples": ints, "uncertainty": numbers, "novelty": numbers,
            "status": st.sampled_from(["accepted", "rejected", "declined"]),
        }

        def npy(shape: tuple, descr: str, fortran: bool, body: int | None) -> bytes:
            """An npy header; ``body`` bytes follow, or (None) as many as the header declares."""
            fh = io.BytesIO()
            np.lib.format.write_array_header_1_0(fh, {"descr": descr, "fortran_order": fortran, "shape": shape})
            if body is None:
                body = min(abs(math.prod(shape)) * np.dtype(descr).itemsize, 4096)
            return fh.getvalue() + b"\0" * body

        dims = st.one_of(st.integers(0, 320), st.integers(-3, -1), st.sampled_from([10**12, 2**62]))
        shapes = st.lists(dims, max_size=3).map(tuple)
        descrs = st.sampled_from(["<f4", ">f8", "<f2", "|O", "<i8", "|b1", "<c8", "<f16", "|V4", "<U3"])  # "<f16": 128 bits
        lying = st.builds(lambda dt, sh, st_, data: Array(dtype=dt, shape=sh, stype=st_, data=data),
                          st.sampled_from(["float32", "float64", "int64", "object", "", "weird"]), shapes,
                          st.sampled_from(["numpy.ndarray", "torch.Tensor", ""]),
                          st.one_of(st.builds(npy, shapes, descrs, st.booleans(), st.one_of(st.none(), st.integers(0, 1300))),
                                    st.binary(max_size=64), st.just(b"\x93NUMPY\x01\x00")))
        dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.bool_, np.complex64])
        small_shapes = st.one_of(st.tuples(st.integers(0, 320)), st.tuples(st.integers(0, 320), st.integers(0, 4)),
                                 st.lists(st.integers(0, 4), max_size=4).map(tuple))
        def filled(dtype, shape: tuple, value: float) -> Array:
            with np.errstate(all="ignore"):
                return Array(np.full(shape, value).astype(dtype))

        real = st.builds(filled, dtypes, small_shapes,
                         st.one_of(st.floats(width=32), st.sampled_from([0.0, 1e6, -1e-3])))
        self.arrays = st.one_of(real, lying)
        self.records = st.one_of(
            st.dictionaries(keys, self.arrays, max_size=3).map(ArrayRecord),
            st.dictionaries(keys, self.config_values, max_size=6).map(ConfigRecord),
            st.dictionaries(keys, self.metric_values, max_size=6).map(MetricRecord))
        self.names = st.one_of(st.sampled_from(["arrays", "config", "metrics"]), st.text(max_size=8))
        self.record_dict = st.dictionaries(self.names, self.records, max_size=4).map(RecordDict)
        self._contents: dict = {}
        self._values = {"ArrayRecord": self.arrays, "ConfigRecord": self.config_values,
                        "MetricRecord": self.metric_values}

    def contents(self, valid):
        """Whole RecordDicts: one drawn from ``valid`` (a strategy of valid messages) and broken
        by 0-3 random edits (a value replaced, by one of any kind or one that passes the field's
        type check, or dropped, a key added, a record added, renamed or of another kind), or
        anything at all. Built once per ``valid``: building is slow."""
        if id(valid) not in self._contents:
            self._contents[id(valid)] = self.st.one_of(self._mutated(valid), self.record_dict)
        return self._contents[id(valid)]

    def _mutated(self, valid):
        st = self.st

        @st.composite
        def strategy(draw):
            content = draw(valid)
            for _ in range(draw(st.integers(0, 3))):
                edit = draw(st.sampled_from(["value", "field", "field", "drop", "key", "record", "rename", "kind"]))
                names = list(content.keys())
                name = draw(st.sampled_from(names)) if names else None
                record = content[name] if name else None
                if edit in ("value", "field", "key") and record is not None:  # a value of the record's kind
                    keys = list(record.keys())
                    key = draw(st.sampled_from(keys)) if keys and edit != "key" else draw(self.keys)
                    kind = type(record).__name__
                    fits = edit == "field" and kind == "ConfigRecord" and key in self._fields
                    record[key] = draw(self._fields[key] if fits else self._values[kind])
                elif edit == "drop" and record is not None and len(record):
                    del record[draw(st.sampled_from(list(record.keys())))]
                elif edit in ("record", "rename", "kind"):
                    moved = content.pop(name) if name is not None and edit != "record" else None
                    target = name if edit == "kind" else draw(self.names)
                    content.pop(target, None)  # replaced, not overwritten: Flower warns about that
                    content[target] = moved if edit == "rename" else draw(self.records)
            return content

        return strategy()


@pytest.fixture(scope="session")
def flower_messages() -> FlowerMessages:
    return FlowerMessages()


class FakeGrid:
    """What ServerRun uses of a Flower grid, without Flower's engine: ``devices`` maps each
    node id to a function that answers a message (or ``None``: no reply); ``keys`` holds each
    node's public key as the SuperLink knows it. Replies come back in the order of the nodes."""

    def __init__(self, devices: dict, keys: dict[int, bytes] | None = None) -> None:
        self.devices, self.keys = dict(devices), dict(keys or {})

    def get_node_ids(self) -> list[int]:
        return list(self.devices)

    def get_nodes(self) -> list:
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=n, public_key=self.keys.get(n, b"")) for n in self.devices]

    def send_and_receive(self, messages, timeout=None) -> list:
        replies = [self.devices[m.metadata.dst_node_id](m) for m in messages]
        return [r for r in replies if r is not None]


@pytest.fixture
def flower_task():
    """A task identity, as Flower sets one in a ServerApp process (Messages need one); yields
    :class:`FakeGrid`, to build grids with."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield FakeGrid
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
