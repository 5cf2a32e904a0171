"""Registers ``optimum-cli maiht`` (prune, eval, push) through optimum's ``optimum.commands.register``
namespace (PEP 420: no ``__init__.py`` anywhere under ``optimum/`` in this distribution).

optimum-cli imports every module here on every start, whatever the command: an import error would break
all of them, so a broken install only disables ``maiht`` (with a warning).
"""

import logging

try:
    from optimum_maiht.cli import MAIHTCommand
except ImportError as err:
    logging.getLogger(__name__).warning("optimum-cli maiht is unavailable (%s); reinstall optimum-maiht", err)
    REGISTER_COMMANDS = []
else:
    REGISTER_COMMANDS = [MAIHTCommand]
