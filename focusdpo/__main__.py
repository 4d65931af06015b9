"""``python -m focusdpo COMMAND ...`` (also ``accelerate launch -m focusdpo train ...``)."""

from focusdpo.commands import main

main()
