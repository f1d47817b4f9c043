from services.common.server import main
from services.registry.app import build

main("registry", build)
