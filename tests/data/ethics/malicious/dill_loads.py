import dill

fn = dill.loads(open("fn.dill", "rb").read())
fn()
