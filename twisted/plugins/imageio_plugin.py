"""
twistd plugin: C{twistd -n imageio} runs the imageio daemon and proxy.

Kept tiny on purpose: plugin discovery imports every plugin module, so the
application (L{imageio.tap}) is imported only when the plugin is used.
"""

from twisted.application.service import ServiceMaker

imageio = ServiceMaker(
    "imageio",
    "imageio.tap",
    "oVirt image I/O: disk image transfer daemon and proxy.",
    "imageio",
)
