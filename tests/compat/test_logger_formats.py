"""The reference logger's classes and helpers under their names (improved_diffusion.logger):
HumanOutputFormat / CSVOutputFormat / JSONOutputFormat / TensorBoardOutputFormat, their bases,
make_output_format, a Logger built by hand, set_comm with an MPI-style communicator,
mpi_weighted_mean and get_rank_without_mpi_import."""

import io
import json
import sys

import pytest

from helpers.training import fake_tensorboard
from iddpm_ext import logger
from iddpm_ext.errors import ArgumentError


@pytest.fixture(autouse=True)
def _restore_logger():
    saved = (logger._current, logger._default, logger.Logger.CURRENT, logger.Logger.DEFAULT)
    yield
    logger._current, logger._default, logger.Logger.CURRENT, logger.Logger.DEFAULT = saved


class FakeComm:
    """An mpi4py-like communicator over simulated ranks: ``gather`` returns what every rank
    passed (rank 0) or None (others), as MPI's does."""

    def __init__(self, rank, parts):
        self.rank, self.parts = rank, parts

    def gather(self, obj, root=0):
        assert root == 0
        return [obj] + self.parts if self.rank == 0 else None


def test_format_classes_have_the_reference_bases():
    for cls in (logger.HumanOutputFormat, logger.CSVOutputFormat, logger.JSONOutputFormat):
        assert issubclass(cls, logger.KVWriter)
    assert issubclass(logger.HumanOutputFormat, logger.SeqWriter)
    assert issubclass(logger.TensorBoardOutputFormat, logger.KVWriter)
    with pytest.raises(NotImplementedError):
        logger.KVWriter().writekvs({"a": 1})
    with pytest.raises(NotImplementedError):
        logger.SeqWriter().writeseq(["a"])


def test_human_output_format_on_a_file_object_and_a_path(tmp_path):
    buf = io.StringIO()
    fmt = logger.HumanOutputFormat(buf)
    fmt.writekvs({"loss": 0.125, "step": 3})
    fmt.writeseq(["hello", "world"])
    fmt.close()  # a file it was given stays open
    lines = buf.getvalue().splitlines()
    assert lines[0] == lines[3] and set(lines[0]) == {"-"}
    assert lines[1].split() == ["|", "loss", "|", "0.125", "|"]
    assert lines[2].split() == ["|", "step", "|", "3", "|"]
    assert lines[4] == "hello world"
    buf.write("still open")

    path = tmp_path / "log.txt"
    for value in (1.5, 2.5):  # a path is opened for appending and closed by close()
        fmt = logger.HumanOutputFormat(str(path))
        fmt.writekvs({"x": value})
        fmt.close()
        assert fmt.file.closed
    text = path.read_text()
    assert "1.5" in text and "2.5" in text

    with pytest.raises(
        ArgumentError, match="filename_or_file: expected a path or a writable text file, got int"
    ):
        logger.HumanOutputFormat(3)


def test_csv_and_json_output_formats(tmp_path):
    csv = logger.CSVOutputFormat(tmp_path / "progress.csv")
    csv.writekvs({"a": 1})
    csv.writekvs({"a": 2, "b": 3})  # a new key widens the header, earlier rows padded
    assert (tmp_path / "progress.csv").read_text().splitlines() == ["a,b", "1,", "2,3"]
    js = logger.JSONOutputFormat(str(tmp_path / "progress.json"))
    js.writekvs({"a": 1.5})
    js.writekvs({"b": "x"})
    assert [json.loads(line) for line in (tmp_path / "progress.json").read_text().splitlines()] == [
        {"a": 1.5},
        {"b": "x"},
    ]


@pytest.mark.parametrize(
    "name,file", [("log", "log-s.txt"), ("csv", "progress-s.csv"), ("json", "progress-s.json")]
)
def test_make_output_format_names_its_files(tmp_path, name, file):
    fmt = logger.make_output_format(name, str(tmp_path / "d"), log_suffix="-s")
    fmt.writekvs({"k": 1})
    fmt.close()
    assert (tmp_path / "d" / file).is_file()


def test_make_output_format_stdout_and_errors(tmp_path, capsys, monkeypatch):
    fmt = logger.make_output_format("stdout", str(tmp_path))
    fmt.writekvs({"k": 7})
    assert "| k | 7 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"format: expected one of \['stdout', .*got 'xml'"):
        logger.make_output_format("xml", str(tmp_path / "none"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        logger.make_output_format("tensorboard", str(tmp_path / "tb"))
    assert not (tmp_path / "tb").exists() and not (tmp_path / "none").exists()


def test_tensorboard_output_format_writes_scalars(tmp_path, monkeypatch):
    written = fake_tensorboard(monkeypatch)
    fmt = logger.make_output_format("tensorboard", str(tmp_path), log_suffix="-r1")
    fmt.writekvs({"loss": 0.5, "step": 10, "name": "x"})
    fmt.close()
    assert written == [("dir", str(tmp_path / "tb-r1")), ("loss", 0.5, 10), "closed"]


def test_a_logger_built_by_hand_writes_to_its_formats(tmp_path):
    buf = io.StringIO()

    class Lines(logger.SeqWriter):  # a log()-only format gets no dumps
        def __init__(self):
            self.seen = []

        def writeseq(self, seq):
            self.seen.append(list(seq))

    lines = Lines()
    csv = logger.CSVOutputFormat(str(tmp_path / "p.csv"))
    lg = logger.Logger(str(tmp_path), [logger.HumanOutputFormat(buf), csv, lines])
    lg.logkv_mean("loss", 1.0)
    lg.logkv_mean("loss", 3.0)
    lg.logkv("step", 5)
    assert lg.dumpkvs() == {"loss": 2.0, "step": 5}
    lg.log("done", level=logger.INFO)
    assert "| loss | 2 " in buf.getvalue() and lines.seen == [["done"]]
    assert (tmp_path / "p.csv").read_text().splitlines() == ["loss,step", "2.0,5"]
    assert lg.name2val == {} and lg.name2cnt == {}


def test_dumpkvs_averages_over_the_communicator(tmp_path):
    # this process is rank 0 of three; the others logged loss means over 1 and 2 values
    others = [{"loss": (4.0, 1)}, {"loss": (1.0, 2), "acc": (0.5, 1)}]
    buf = io.StringIO()
    lg = logger.Logger(str(tmp_path), [logger.HumanOutputFormat(buf)], comm=FakeComm(0, others))
    lg.logkv_mean("loss", 2.0)
    lg.logkv_mean("loss", 4.0)  # (3.0, count 2)
    out = lg.dumpkvs()
    assert out == {"loss": pytest.approx((3.0 * 2 + 4.0 + 1.0 * 2) / 5), "acc": 0.5}
    # a rank other than 0 writes nothing and gets {}
    buf1 = io.StringIO()
    lg1 = logger.Logger(str(tmp_path), [logger.HumanOutputFormat(buf1)], comm=FakeComm(1, []))
    lg1.logkv("loss", 1.0)
    assert lg1.dumpkvs() == {} and buf1.getvalue() == ""
    # set_comm on the current logger
    current = logger.configure(dir=str(tmp_path / "c"), format_strs=["json"])
    assert logger.Logger.CURRENT is current
    logger.set_comm(FakeComm(0, [{"x": (3.0, 1)}]))
    logger.logkv("x", 1.0)
    assert logger.dumpkvs() == {"x": 2.0}
    logger.set_comm(None)
    logger.logkv("x", 1.0)
    assert logger.dumpkvs() == {"x": 1.0}
    rows = [json.loads(line) for line in (tmp_path / "c" / "progress.json").read_text().splitlines()]
    assert rows == [{"x": 2.0}, {"x": 1.0}]


def test_configure_passes_comm_to_the_logger(tmp_path):
    comm = FakeComm(0, [])
    lg = logger.configure(dir=str(tmp_path), format_strs=[], comm=comm)
    assert lg.comm is comm and logger.get_current() is lg


def test_mpi_weighted_mean():
    parts = [{"a": (2.0, 1), "s": ("text", 1)}, {"a": (5.0, 2), "z": (1.0, 0)}]
    with pytest.warns(UserWarning, match="s = 'text' is not a number, left out"):
        got = logger.mpi_weighted_mean(FakeComm(0, parts[1:]), parts[0])
    assert got == {"a": 4.0}
    assert logger.mpi_weighted_mean(FakeComm(2, []), parts[0]) == {}


def test_logger_current_and_default_follow_the_module(tmp_path):
    first = logger.configure(dir=str(tmp_path / "a"), format_strs=[])
    assert logger.Logger.CURRENT is first
    with logger.scoped_configure(dir=str(tmp_path / "b"), format_strs=[]) as inner:
        assert logger.Logger.CURRENT is inner is logger.get_current()
    assert logger.Logger.CURRENT is first


@pytest.mark.parametrize(
    "env,rank", [({}, 0), ({"PMI_RANK": "2"}, 2), ({"OMPI_COMM_WORLD_RANK": "3"}, 3), ({"RANK": "1"}, 1)]
)
def test_get_rank_without_mpi_import(monkeypatch, env, rank):
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert logger.get_rank_without_mpi_import() == rank
