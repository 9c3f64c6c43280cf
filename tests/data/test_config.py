"""DataConfig validation and blend/split parsing: errors name the field and the value."""

import pytest

from megatron_ntp.data.config import DataConfig, parse_blend, parse_split


def test_defaults_and_blend_forms():
    assert DataConfig().blend_tuple() is None
    assert parse_blend("0.3 data/a_text_document 0.7 data/b_text_document") == (
        ["data/a_text_document", "data/b_text_document"], [0.3, 0.7])
    assert parse_blend(["30", "a", "70", "b"]) == (["a", "b"], [30.0, 70.0])
    assert parse_blend([30, "a", 70, "b"]) == (["a", "b"], [30.0, 70.0])
    assert parse_blend("a b c") == (["a", "b", "c"], None)
    assert DataConfig(blend="1 x").blend_tuple() == (["x"], [1.0])


@pytest.mark.parametrize("blend, message", [
    ("", "data.blend is empty"),
    ("0.3 a 0.7", "odd number of words"),
    ("x 1", "data.blend: expected a weight, got 'x'"),
    ("1 2", "expected a prefix after weight '1', got the number '2'"),
    ("-1 a 2 b", "weight '-1' for 'a' must be a positive"),
    ("nan a 1 b", "weight 'nan'"),
    ({"a": 1}, r"data.blend: unknown split\(s\) \['a'\]"),
    ({"train": None}, "the per-split blend names no split"),
    ({"train": {"x": 1}}, "data.blend.train must be a string, a list of words"),
    ("file:/nonexistent/blend.txt", "data.blend: cannot read the blend file '/nonexistent/"),
    ("1 a file:b.txt", "must be the blend's only word"),
    (True, "data.blend must be a string"),
])
def test_bad_blends(blend, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(blend=blend)


def test_split():
    assert parse_split("969,30,1") == [0.969, 0.03, 0.001]
    assert parse_split("98,2") == [0.98, 0.02, 0.0]
    for bad in ("a,b", "0,0,0", "1,2,3,4", "-1,2", ""):
        with pytest.raises(ValueError, match=f"data.split .*{bad!r}"):
            DataConfig(split=bad)


@pytest.mark.parametrize("field, value", [
    ("seq_length", 0), ("seq_length", 2.5), ("seq_length", True), ("seed", -1),
    ("cache_dir", 3), ("tokenizer_type", "bert"), ("tokenizer_model", 5),
    ("reset_position_ids", "yes"), ("reset_attention_mask", 1), ("eod_mask_loss", None),
])
def test_bad_fields_name_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"data\.{field}.*{value!r}" if field != "tokenizer_type"
                       else r"data\.tokenizer_type: tokenizer type 'bert'"):
        DataConfig(**{field: value})


def test_validate_catches_later_assignment():
    cfg = DataConfig()
    cfg.seq_length = -5
    with pytest.raises(ValueError, match="data.seq_length must be a positive integer, got -5"):
        cfg.validate()


def test_blend_file_errors_name_the_line(tmp_path):
    path = tmp_path / "blend.txt"
    path.write_text("# weights and prefixes\n0.5 data/a\n0.5 0.2\n")
    with pytest.raises(ValueError, match=rf"^{path}:3: expected a prefix after weight '0.5'"):
        DataConfig(blend=f"file:{path}")
    path.write_text("0.5 data/a\n-1 data/b\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: weight '-1' for 'data/b' must be"):
        DataConfig(blend=f"file:{path}")
    path.write_text("# nothing but comments\n\n")
    with pytest.raises(ValueError, match="names no prefix"):
        DataConfig(blend=f"file:{path}")
    path.write_text("2 data/a # first\n3 data/b\n")
    assert DataConfig(blend=f"file:{path}").blend_tuple() == (["data/a", "data/b"], [2.0, 3.0])
    assert DataConfig(blend={"valid": f"file:{path}"}).blend_per_split() == [
        None, (["data/a", "data/b"], [2.0, 3.0]), None]
