"""What the Training cell shows while it trains: the trainer's events as they happen, each epoch's row,
and the progress bar turned into a text line at the end.

The trainer emits every user-facing message as an INFO record on the logger `utils.training.events`,
and one record per finished epoch with `extra={"epoch_row": row}` (the metrics.jsonl dict). A runtime
that dies mid-run has then already printed what was saved. The progress bar is a tqdm widget while it
runs; a widget's state is not saved with the notebook, so at the end the bar is closed (a closed
widget is not drawn when the notebook is reopened) and its last state printed as text.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._namespace import notebook_words

EVENTS_LOGGER = "utils.training.events"
TABLE_TAIL = 5  # epochs shown in a table; the Dashboard and metrics_df have the rest
SKIP_IN_ROW = {"epoch", "step", "time", "learning_rate", "grad_norm", "grad_norm_std", "tokens_per_second"}


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """train/loss, val/loss, then every other train/ or val/ number the rows carry (task metrics)."""
    names: list[str] = []
    for row in rows:
        for key, value in row.items():
            if ("/" in key and key.split("/", 1)[0] in ("train", "val") and key not in names
                    and isinstance(value, (int, float)) and not key.startswith(("train/drift", "val/drift"))):  # fmt: skip
                names.append(key)
    first = [n for n in ("train/loss", "val/loss") if n in names]
    return first + [n for n in names if n not in first]


def epoch_line(row: dict[str, Any], epochs: int | None = None) -> str:
    """One finished epoch in one line: `epoch 3/30  train/loss 3.1112  val/loss 2.8525  ...  (4.2 s)`."""
    total = f"/{epochs}" if epochs else ""
    parts = [f"epoch {row.get('epoch')}{total}"]
    parts += [f"{name} {_number(row[name])}" for name in metric_columns([row])]
    if isinstance(row.get("epoch_seconds"), (int, float)):
        parts.append(f"({row['epoch_seconds']:.1f} s)")
    return "  ".join(parts)


def print_table(rows: list[dict[str, Any]], tail: int = TABLE_TAIL) -> None:
    """The last `tail` epochs as a table, with a count of the others (the Dashboard shows them all)."""
    if not rows:
        print("  (no completed epoch yet)")
        return
    columns = metric_columns(rows)
    width = {c: max(len(c), 8) for c in columns}
    print("  epoch  " + "  ".join(f"{c:>{width[c]}}" for c in columns))
    if len(rows) > tail:
        print(f"  ... {len(rows) - tail} earlier epoch(s): see the Dashboard cell or metrics_df")
    for row in rows[-tail:]:
        print(f"  {row.get('epoch'):>5}  " + "  ".join(f"{_number(row.get(c)):>{width[c]}}" for c in columns))


class EventPrinter(logging.Handler):
    """Prints the trainer's events as they happen (INFO; warnings are printed by `text_output`)."""

    def __init__(self, epochs: int | None = None, run_name: str | None = None) -> None:
        super().__init__(logging.INFO)
        self.epochs, self.run_name = epochs, run_name
        self.said: list[str] = []
        self.rows_printed = 0

    def emit(self, record: logging.LogRecord) -> None:
        row = getattr(record, "epoch_row", None)
        if isinstance(row, dict):
            print(f"  {epoch_line(row, self.epochs)}", flush=True)
            self.rows_printed += 1
            self._val_loss_on_bar(row.get("val/loss"))
            return
        if record.levelno >= logging.WARNING:
            self.said.append(record.getMessage())  # printed by text_output's handler, with its mark
            return
        message = record.getMessage()
        self.said.append(message)
        print(f"  {notebook_words(message)}", flush=True)

    def _val_loss_on_bar(self, value: Any) -> None:
        """The run's progress bar (named after the run) shows the last epoch's validation loss."""
        if not isinstance(value, (int, float)) or not self.run_name:
            return
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            if str(bar.desc).split(" · ")[0] == self.run_name:
                bar.set_description_str(f"{self.run_name} · val/loss {value:.3f}", refresh=False)


@contextmanager
def live_events(epochs: int | None = None, run_name: str | None = None) -> Iterator[EventPrinter]:
    """Attach an EventPrinter to the trainer's events logger for the duration of the block."""
    logger = logging.getLogger(EVENTS_LOGGER)
    printer = EventPrinter(epochs, run_name)
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(printer)
    try:
        yield printer
    finally:
        logger.removeHandler(printer)
        logger.setLevel(level)


def _bar_text(container: Any) -> str | None:
    """The text of a tqdm notebook bar (`desc: 100%|██████████| 40/40 [...]`) from its widgets."""
    children = getattr(container, "children", ())
    if len(children) != 3 or not hasattr(children[1], "max"):
        return None
    left, bar, right = (html.unescape(str(children[0].value)), children[1], html.unescape(str(children[2].value)))
    fraction = bar.value / bar.max if bar.max else 0.0
    filled = int(round(10 * fraction))
    return f"{left.strip()}|{'█' * filled}{' ' * (10 - filled)}|{right}".replace("\u2007", " ")


@contextmanager
def bars_end_as_text() -> Iterator[None]:
    """While the block runs, tqdm's notebook bars are displayed with a display id; when it ends, each is
    closed and its display replaced by the bar's last state as text. A notebook keeps no widget state, so
    a saved notebook then shows the finished bar, not "Error displaying widget" (and nothing is cleared:
    the messages printed around the bar stay where they are)."""
    try:
        import tqdm.notebook as tqdm_notebook
    except ImportError:
        yield
        return
    original = getattr(tqdm_notebook, "display", None)
    if original is None:
        yield
        return
    shown: list[tuple[Any, Any]] = []

    def display(obj: Any, *args: Any, **kwargs: Any) -> Any:
        handle = original(obj, *args, display_id=True, **kwargs)
        shown.append((handle, obj))
        return handle

    tqdm_notebook.display = display
    try:
        yield
    finally:
        tqdm_notebook.display = original
        for handle, container in shown:
            text = _bar_text(container)
            for widget in [*getattr(container, "children", ()), container]:
                widget.close()
            if handle is not None and text:
                handle.update({"text/plain": text}, raw=True)


def in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")
