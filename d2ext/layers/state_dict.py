def rename_reference_keys(module, state_dict, prefix, rename, error_msgs, source, ignored=()):
    """Rename, in place, a reference implementation's checkpoint keys under ``prefix`` to ``module``'s names.

    Meant for ``module._load_from_state_dict`` (versioned state-dict upgrade, as in Detectron2's
    PointRend), so that Detectron2's own ``DetectionCheckpointer(model).load(path)`` loads released
    checkpoints. Keys already in ``module``'s names pass unchanged.

    Args:
        module: the ``nn.Module`` that owns every key under ``prefix``.
        state_dict: the state dict being loaded (modified in place).
        prefix: ``module``'s prefix in ``state_dict`` (ends with ".", or "" for the root).
        rename: ``f(local_name) -> own local name``, or None when ``local_name`` is not a reference name.
        error_msgs: the list given to ``_load_from_state_dict``; ``load_state_dict`` raises its entries.
            An unknown key, or a renamed tensor whose shape differs from the module's, is an entry
            naming the checkpoint key.
        source: name of the reference implementation, for the messages.
        ignored: local names of the reference that carry no weights here (dropped).
    """
    own_shapes = {name: tuple(value.shape) for name, value in module.state_dict().items()}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        if local in own_shapes:
            continue
        if local in ignored:
            del state_dict[key]
            continue
        new_local = rename(local)
        if new_local is None or new_local not in own_shapes:
            # Say why this is an error rather than Detectron2's "unused key" warning: the checkpoint
            # (e.g. one without this repository's version metadata) is read as the reference's.
            error_msgs.append(f"unknown key {key!r}: {type(module).__name__} has no such parameter and it is no "
                              f"{source} name of one (the checkpoint is read as {source}'s)")
            continue
        value = state_dict.pop(key)
        if tuple(value.shape) != own_shapes[new_local]:
            error_msgs.append(
                f"{source} key {key!r} (loaded as {prefix + new_local!r}) has shape {tuple(value.shape)} "
                f"in the checkpoint but {own_shapes[new_local]} in the model (to fine-tune a released model "
                f"on another class count, convert it with projects/convert_checkpoint.py and the released "
                f"model's config first: Detectron2 then skips the layers whose shapes differ, with a warning)"
            )
            continue
        state_dict[prefix + new_local] = value


class ReferenceCheckpointMixin:
    """Loads a reference implementation's parameter names into an ``nn.Module`` subclass.

    Checkpoints saved by this repository carry the module's ``_version`` (2); unversioned ones (or
    version 1) are the reference's, and their keys are renamed by ``_rename_reference_key`` through
    ``rename_reference_keys``. List the mixin before ``nn.Module`` in the bases.
    """

    _version = 2
    _reference_source = "reference"  # name of the reference implementation, for error messages

    def _rename_reference_key(self, local_name):
        """Reference local name -> own local name, or None if unknown."""
        return None

    def _ignored_reference_keys(self):
        """Reference local names that carry no weights in this module as configured (dropped on load)."""
        return ()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            rename_reference_keys(self, state_dict, prefix, self._rename_reference_key, error_msgs,
                                  self._reference_source, ignored=self._ignored_reference_keys())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def keys_reference_checkpoints_lack(model):
    """The state-dict keys of ``model`` that a released (reference) checkpoint of it does not hold and whose
    initial values are the ones to keep (such as the official MBRM constants): every module lists its own,
    as local names, in an attribute ``reference_checkpoints_lack``."""
    return {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            for name in getattr(module, "reference_checkpoints_lack", ())}


def _some_keys(keys, count=4):
    """"N: a, b, c, d, ..." for an error message."""
    return f"{len(keys)}: {', '.join(keys[:count])}{', ...' if len(keys) > count else ''}"


def _raise_if_nothing_loaded(module, incompatible_keys):
    """``load_state_dict`` post-hook of :func:`register_empty_load_check`."""
    # BatchNorm fills in a missing ``num_batches_tracked`` itself: it is never reported missing.
    own = [key for key in module.state_dict() if not key.endswith("num_batches_tracked")]
    missing = set(incompatible_keys.missing_keys)
    # ``module``'s prefix in the loaded dict: "" at the root, "module." inside DDP.
    prefixes = {key[: len(key) - len(own[0])] for key in missing if key.endswith(own[0])} if own else ()
    if not any(all(prefix + key in missing for key in own) for prefix in prefixes):
        return
    unexpected = incompatible_keys.unexpected_keys
    found = (f"Checkpoint keys that are not the model's ({_some_keys(unexpected)})" if unexpected else
             "The checkpoint is empty, or its keys with the model's names have other shapes (skipped)")
    raise RuntimeError(
        f"Nothing was loaded into {type(module).__name__}: the checkpoint has none of its parameters and buffers "
        f"with their shapes (is it a checkpoint of another architecture or backbone?). {found}; "
        f"model keys ({_some_keys(own)})."
    )


def register_empty_load_check(model):
    """Make ``model.load_state_dict`` (so also Detectron2's ``DetectionCheckpointer.load``, which loads
    with ``strict=False`` and only logs what it skips) raise a RuntimeError when the state dict matches
    none of ``model``'s parameters and buffers: a model left at its random initialisation must not look
    loaded. Partial loads (an ImageNet backbone, another class count) keep Detectron2's log report.
    Call it in a meta-architecture's ``__init__``; it also works when ``model`` is wrapped (DDP). Idempotent.
    """
    if not getattr(model, "_has_empty_load_check", False):
        model.register_load_state_dict_post_hook(_raise_if_nothing_loaded)
        model._has_empty_load_check = True
