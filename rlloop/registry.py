"""The `@register(name)` decorator behind rlloop's plain name -> function registries (policy losses, KL
estimators, search aggregations): config picks the function by its registered name.

It imports nothing, so that algos/ (pure torch) and search/ (torch-free) can both use it.
"""


def registrar(registry: dict, what: str):
    """`register = registrar(REGISTRY, "policy loss")`: then `@register("ppo")` puts the function into
    `REGISTRY["ppo"]` and returns it unchanged; a name registered twice is a ValueError naming `what`."""

    def register(name: str):
        def decorator(fn):
            if name in registry:
                raise ValueError(f"{what} {name!r} is already registered")
            registry[name] = fn
            return fn

        return decorator

    return register
