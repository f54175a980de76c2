"""mvitv2.errors by value: a user error keeps the arguments it was given, and one re-raised from a
DataLoader worker is its original message exactly, whatever characters that message ends with."""

from __future__ import annotations

from pathlib import Path

from mvitv2.errors import UserError, UserFileNotFoundError, unknown_names_message


def _from_worker(type_name: str, message: str) -> str:
    """What torch's DataLoader makes of a worker's exception (ExceptionWrapper), written out."""
    return (
        f"Caught {type_name} in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "w.py", line 3, in load\n    read()\n'
        f"mvitv2.errors.{type_name}: {message}\n"
    )


def test_a_user_error_keeps_no_several_or_non_string_arguments_as_given():
    """Only a single string argument is read as a possibly wrapped message; any other
    arguments are kept as they are (as for a built-in exception)."""
    path = Path("missing.yaml")
    assert UserError().args == ()
    assert UserError("first", "second").args == ("first", "second")
    assert UserError(path).args == (path,)
    assert UserFileNotFoundError(2, "no such file").args == (2, "no such file")
    assert str(UserError("a message")) == "a message"


def test_a_worker_s_message_comes_back_exactly_with_its_last_characters():
    """The original message is not trimmed: trailing spaces and a trailing 'X' are its own
    (only the newline that ends the traceback goes)."""
    for message in ("ends with a space ", "ends with a tab\t", "size must be 4X", "two\nlines X"):
        wrapped = _from_worker("UserError", message)
        assert str(UserError(wrapped)) == message
        assert str(UserFileNotFoundError(wrapped)) == message


def test_an_unknown_name_is_offered_its_three_closest_valid_names_at_most():
    """Four valid names are close to 'abcdef' (similarity 2 * 6 / (6 + len): 0.92, 0.86, 0.8,
    0.75); the three closest are suggested, closest first."""
    valid = ["abcdefghij", "abcdefgh", "abcdefg", "abcdefghi", "zzz"]
    assert unknown_names_message("option", ["abcdef"], valid) == (
        "unknown option 'abcdef' (did you mean 'abcdefg' or 'abcdefgh' or 'abcdefghi'?)"
    )
