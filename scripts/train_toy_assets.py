"""Train the toy world shipped in dcgen/assets/toy (see dcgen/toy/train_assets.py).

python scripts/train_toy_assets.py --out dcgen/assets/toy
"""

from dcgen.toy.train_assets import main

if __name__ == "__main__":
    raise SystemExit(main())
