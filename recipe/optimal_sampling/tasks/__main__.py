"""`python -m recipe.optimal_sampling.tasks [--task addition|carry] [--jobs 2] [--retrain] [--cache-dir DIR]`: train
(or load) the task models."""

from recipe.optimal_sampling.tasks.cache import main

if __name__ == "__main__":
    main()
