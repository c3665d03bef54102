"""The jobs the CLI runs: each orchestrates the layers below it (data, train, eval) and holds no
math of its own. Imports point down: cli -> jobs -> train / eval / export / bench."""
