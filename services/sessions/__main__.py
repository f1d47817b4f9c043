from services.common.server import main
from services.sessions.app import build

main("sessions", build)
