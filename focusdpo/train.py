"""``accelerate launch -m focusdpo.train --config recipes/X.yaml``: the launch line of earlier versions and of the
recipes, kept working; the same as ``accelerate launch -m focusdpo train ...``."""

if __name__ == "__main__":
    import sys

    from focusdpo.commands import main

    main(["train", *sys.argv[1:]])
