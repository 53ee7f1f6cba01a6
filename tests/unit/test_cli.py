"""training/cli.py: the one line a user error ends with, also when a DataLoader worker raised it."""

from dataset.lines import DataError
from training.cli import _user_message


def test_a_worker_error_keeps_its_whole_message_and_nothing_of_the_traceback():
    message = "shards/part-00001.jsonl.zst:261: invalid JSON\ndata.on_error: set it to skip"
    text = (
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "dataset/jsonl_zst.py", line 140, in iter_documents\n    raise DataError(message)\n'
        f"dataset.lines.DataError: {message}"
    )
    assert _user_message(DataError(text)) == message
    assert _user_message(DataError("data.train is empty")) == "data.train is empty"
