"""The bundled ImageNet-1k class names and the prompt sources of eval."""

from __future__ import annotations

import json

import pytest

from catome_export.errors import CatomeError
from catome_export.evaluation.prompts import (PROMPT_TEMPLATE, imagenet_classes, imagenet_indices, imagenet_prompts,
                                              load_prompts)


def test_there_are_1000_classes_in_index_order():
    names = imagenet_classes()
    assert len(names) == 1000
    assert all(n == n.strip() and n for n in names)
    # anchors of the standard index order
    assert names[0] == "tench" and names[1] == "goldfish"
    assert names[207] == "golden retriever" and names[281] == "tabby"
    assert names[409] == "analog clock" and names[954] == "banana"
    assert names[999] == "toilet tissue"
    # the two names that the standard list carries twice (different synsets)
    assert names[134] == names[517] == "crane"
    assert names[638] == names[639] == "maillot"
    assert len(set(names)) == 998


def test_prompts_use_the_paper_template():
    prompts = imagenet_prompts(4)
    names = imagenet_classes()
    assert prompts == [PROMPT_TEMPLATE.format(names[i]) for i in (0, 250, 500, 750)]
    assert prompts[0] == "A high-quality photograph of a tench."


def test_orders_and_repeats():
    assert imagenet_indices(3, "first") == [0, 1, 2]
    assert imagenet_indices(3, "spaced") == [0, 333, 666]
    assert imagenet_indices(1000) == list(range(1000))
    many = imagenet_indices(2000)
    assert many[:1000] == many[1000:] == list(range(1000))


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_counts_raise(n):
    with pytest.raises(CatomeError):
        imagenet_prompts(n)


def test_unknown_order_raises():
    with pytest.raises(CatomeError, match="order"):
        imagenet_prompts(3, "random")


def test_text_file_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na red car\n\n  a blue house  \n")
    assert load_prompts(path) == ["a red car", "a blue house"]


def test_json_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["one", " two ", ""]))
    assert load_prompts(path) == ["one", "two"]


@pytest.mark.parametrize("name,content,match", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "# nothing\n\n", "no prompt"),
    ("bad.json", "{not json", "not valid JSON"),
    ("dict.json", '{"a": 1}', "list of strings"),
])
def test_bad_prompt_files_raise(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(CatomeError, match=match):
        load_prompts(path)
