"""ditmoe.cli: flags need help, old spellings are hidden aliases, usage errors exit 2, runtime errors exit 1."""

import pytest

from ditmoe.cli import Positive, make_parser, user_errors


def parser():
    p = make_parser("usage: demo --steps N", prog="demo")
    p.add_argument("--zero-stage", type=int, required=True, choices=(0, 1, 2, 3), aliases=["--zero"], help="stage")
    p.add_argument("--steps", action=Positive, aliases=["--num-steps"], help="steps")
    p.add_argument("--set", action="append", default=[], aliases=["--override"], help="KEY=VALUE")
    return p


def test_every_flag_needs_help():
    p = make_parser("doc")
    with pytest.raises(ValueError, match="--steps: every flag needs help"):
        p.add_argument("--steps", type=int)
    with pytest.raises(ValueError, match="--a: every flag needs help"):
        p.add_mutually_exclusive_group().add_argument("--a")
    with pytest.raises(ValueError, match="--b: every flag needs help"):
        p.add_argument_group("group").add_argument("--b")
    assert not {"--steps", "--a", "--b"} & set(p._option_string_actions)


def test_old_spellings_parse_as_the_new_flags_and_stay_out_of_help():
    p = parser()
    old = p.parse_args(["--zero", "2", "--num-steps=5", "--override", "a=1", "--set", "b=2"])
    assert vars(old) == {"zero_stage": 2, "steps": 5, "set": ["a=1", "b=2"]}
    assert p.as_typed("--zero-stage") == "--zero" and p.as_typed("--set") == "--override"
    assert vars(p.parse_args(["--zero-stage", "2", "--steps", "5"])) == {"zero_stage": 2, "steps": 5, "set": []}
    assert p.as_typed("--zero-stage") == "--zero-stage"
    assert "--zero " not in p.format_help() and "--num-steps" not in p.format_help()
    assert p.parse_known_args(["--zero", "1", "--", "--zero"])[1] == ["--", "--zero"]


def test_alias_errors():
    p = parser()
    with pytest.raises(ValueError, match="alias --old: no flag --new"):
        p.add_alias("--old", "--new")
    with pytest.raises(ValueError, match="alias --steps: already a flag"):
        p.add_alias("--steps", "--zero-stage")


@pytest.mark.parametrize("argv, message", [
    (["--zero-stage", "1", "--steps", "0"], "demo: error: --steps must be positive, got 0"),
    (["--zero-stage", "1", "--num-steps", "-3"], "demo: error: --num-steps must be positive, got -3"),
    (["--steps", "1"], "demo: error: the following arguments are required: --zero-stage"),
    (["--zero", "5"], "demo: error: argument --zero-stage: invalid choice: 5"),
])
def test_usage_errors_exit_2_naming_the_option(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_positive_floats():
    p = make_parser("doc")
    p.add_argument("--gpu-memory", action=Positive, type=float, help="GiB")
    assert p.parse_args(["--gpu-memory", "0.5"]).gpu_memory == 0.5
    with pytest.raises(SystemExit):
        p.parse_args(["--gpu-memory", "0"])


@pytest.mark.parametrize("error", [FileNotFoundError("x.pt: no such file"), ValueError("x.pt: bad value"),
                                   KeyError("x.pt: missing key"), PermissionError("x.pt: denied")])
def test_user_errors_exit_1_with_the_message(error):
    with pytest.raises(SystemExit) as exit_info, user_errors():
        raise error
    assert str(exit_info.value) == f"error: {error}"


def test_other_errors_keep_their_traceback():
    with pytest.raises(RuntimeError), user_errors():
        raise RuntimeError("a bug")
    with pytest.raises(SystemExit, match="error: corrupt file"), user_errors(RuntimeError):
        raise RuntimeError("corrupt file")


def test_help_keeps_the_usage_lines_as_written():
    assert "usage: demo --steps N" in parser().format_help()
