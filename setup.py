"""Install ``hft-plugin.pth`` (the start-up hook, see hft_plugin/bootstrap/startup.py) at the top of
site-packages, for wheels and for editable installs alike. Everything else is in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = os.path.join("hft_plugin", "bootstrap", "hft-plugin.pth")


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            # An editable wheel is made of the files its install step puts in the unpacked
            # wheel, not of build_lib: put the .pth there so `pip install -e .` installs it too.
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.copy_file(PTH, os.path.join(target, os.path.basename(PTH)), preserve_mode=0)

    def get_outputs(self, *args, **kwargs):
        outputs = super().get_outputs(*args, **kwargs)
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, os.path.basename(PTH)))
        return outputs


setup(cmdclass={"build_py": build_py_with_pth})
