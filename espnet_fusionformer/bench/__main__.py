"""``python -m espnet_fusionformer.bench``."""

from espnet_fusionformer.bench.cli import main

main()
