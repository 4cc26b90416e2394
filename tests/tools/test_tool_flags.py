"""Every tool documents every flag, and the flags renamed to the training command's names keep their old spellings."""

import json

import pytest

from conftest import load_tool

TOOLS = ["analyze_routing", "convert_ckpt_to_hf", "evaluate", "model_card", "plan", "precompute_latents", "sample",
         "upcycle"]


@pytest.mark.parametrize("name", TOOLS)
def test_every_flag_has_help(name):
    parser = load_tool(name).build_parser()
    for action in parser._actions:
        assert action.help, f"tools/{name}.py: {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("name, old, new", [
    ("plan", ["--zero", "3", "--micro-batch", "16", "--act-ckpt", "--image-size", "512"],
     ["--zero-stage", "3", "--micro-batch-size", "16", "--activation-checkpointing", "--resolution", "512"]),
    ("plan", ["--zero", "1", "--micro-batch", "4", "--act-ckpt", "2"],
     ["--zero-stage", "1", "--micro-batch-size", "4", "--activation-checkpointing", "2"]),
    ("precompute_latents", ["--output", "out"], ["--out", "out"]),
])
def test_old_flag_spellings_still_parse(name, old, new):
    required = {
        "plan": ["--preset", "tiny", "--nodes", "1", "--gpus-per-node", "2"],
        "precompute_latents": ["--input", "a.tar", "--resolution", "256", "--vae", "vae"],
    }[name]
    parser = load_tool(name).build_parser()
    assert parser.parse_args([*required, *old]) == parser.parse_args([*required, *new])


def test_documented_flags_match_the_training_command():
    flags = {flag for name in TOOLS for action in load_tool(name).build_parser()._actions
             for flag in action.option_strings}
    assert {"--zero-stage", "--micro-batch-size", "--activation-checkpointing", "--resolution", "--out"} <= flags
    assert not flags & {"--zero", "--micro-batch", "--act-ckpt", "--image-size", "--output"}


def test_model_card_takes_model_settings_as_the_training_command_spells_them(capsys):
    def card(*sets):
        load_tool("model_card").main(["--preset", "tiny", "--json", *(a for s in sets for a in ("--set", s))])
        return json.loads(capsys.readouterr().out)

    plain, prefixed = card("depth=3", "routing=expert_choice"), card("model.depth=3", "model.routing=expert_choice")
    assert prefixed == plain and plain["config"]["depth"] == 3 and plain["config"]["routing"] == "expert_choice"
    assert plain != card()
