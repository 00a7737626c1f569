"""What an edited video says about how it was made: the container tags ``tokenflow edit`` writes
(``edit_tags``) and reads back for ``tokenflow report`` / ``metrics`` (``read_edit_tags``).

    comment               "tokenflow edit: PROMPT" (+ " [made with --model tiny: ...]")
    tokenflow_prompt      the prompt
    tokenflow_model       the --model value (a Hub id, folder, version or "tiny")
    tokenflow_tiny_model  "yes" when a random-weights model made the edit, else "no"

Videos written before the ``tokenflow_*`` keys carry only the comment; its tiny-model note is
recognised too.
"""
from __future__ import annotations

from typing import Dict, Optional

COMMENT_PREFIX = "tokenflow edit: "
TINY_MARKER = "[made with --model tiny"


def edit_tags(prompt: str, model: str, tiny: bool, tiny_note: str) -> Dict[str, str]:
    """The container tags of an edited video."""
    return {"comment": COMMENT_PREFIX + prompt + (f" [{tiny_note}]" if tiny else ""),
            "tokenflow_prompt": prompt, "tokenflow_model": str(model), "tokenflow_tiny_model": "yes" if tiny else "no"}


def read_edit_tags(path: str) -> Dict[str, Optional[object]]:
    """``{"made_by_tokenflow", "prompt", "model", "tiny"}`` from a video's container tags (PyAV);
    all None/False for a folder of images, a file PyAV cannot open, or another program's video."""
    found: Dict[str, Optional[object]] = {"made_by_tokenflow": False, "prompt": None, "model": None, "tiny": False}
    import av  # noqa: PLC0415  (only when a command reads a video)

    try:
        with av.open(str(path)) as container:
            tags = {str(k).lower(): str(v) for k, v in container.metadata.items()}
    except (OSError, ValueError, av.error.FFmpegError):
        return found
    comment = tags.get("comment", "")
    if "tokenflow_model" in tags:
        found.update(made_by_tokenflow=True, prompt=tags.get("tokenflow_prompt"), model=tags["tokenflow_model"],
                     tiny=tags.get("tokenflow_tiny_model") == "yes")
    elif comment.startswith(COMMENT_PREFIX):
        text = comment[len(COMMENT_PREFIX):]
        tiny = TINY_MARKER in text
        found.update(made_by_tokenflow=True, prompt=text.split(" " + TINY_MARKER)[0] if tiny else text, tiny=tiny)
    return found
