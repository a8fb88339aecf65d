"""The words a true/false setting accepts, the same in every place that reads one.

Used by the ``HFT_*`` variables (:mod:`hft_plugin.bootstrap.env`), the plugin autoload switch
(:mod:`hft_plugin.plugins`) and ``import hft_plugin.auto``. The start-up line in
``bootstrap/hft-plugin.pth`` keeps a literal copy of :data:`OFF`, since it runs in every Python
process before anything can be imported; a test checks that copy against this one.

Standard library only: the start-up hook imports it.

    >>> read(" Yes "), read("off"), read("flase")
    (True, False, None)
"""

from __future__ import annotations

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")
WORDS = f"{'/'.join(ON)} or {'/'.join(OFF)}"
"""How a message names the accepted words."""


def read(text: str) -> bool | None:
    """True for a word of :data:`ON`, False for one of :data:`OFF` (any case, spaces around
    ignored), None for anything else, the empty string included."""
    value = text.strip().lower()
    if value in ON:
        return True
    if value in OFF:
        return False
    return None
