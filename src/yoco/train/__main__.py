"""``python -m yoco.train`` (and so ``torchrun ... -m yoco.train``) takes ``yoco train``'s flags. The
training loop (``yoco.train``) knows nothing of the command line; this entry point is the command's."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
