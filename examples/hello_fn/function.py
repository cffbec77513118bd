def handler(event):
    return f"Hello {event.get('name', 'World')}!"
